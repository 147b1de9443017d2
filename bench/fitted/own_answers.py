# the fit's own inputs with the dense model's answers as a LLaVA JSON (targets for a short refinement)
import json, sys
from pathlib import Path
from roe_core.fit import scene_inputs
from roe_core.fit.core import split
out = Path(sys.argv[1]); (out / "images").mkdir(parents=True, exist_ok=True)
items = scene_inputs(256, "train")
fit_idx, _ = split(256, 48, 0)
answers = json.loads(Path("/tmp/fit_e256/cache/fit/dense.json").read_text())["answers"]
recs = []
for k, (i, a) in enumerate(zip(fit_idx, answers)):
    im, q = items[i]
    im.save(out / "images" / f"{k}.png")
    recs.append({"image": f"{k}.png", "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
(out / "data.json").write_text(json.dumps(recs))
print(len(recs))
