"""RoE on any LLaVA model without the training recipe: parts fitted to the model's own dense answers.

    from roe_core.fit import FitConfig, fit_parts, scene_inputs, llava_inputs, folder_inputs
    from roe_core.systems import load_base

    loaded = load_base("embedded")                       # or a local LLaVA folder, or a hub id
    inputs = scene_inputs(1000, split="train")           # [(PIL image, question)]: no answers needed
    summary = fit_parts(loaded, inputs, "runs/fit", cfg=FitConfig(target_agreement=0.9), progress=None,
                        checkpoint=None)
    RoEPipeline.from_base(loaded, parts="runs/fit/roe")  # or: python app.py --roe runs/fit/roe
    StaticPipeline.from_base(loaded, parts="runs/fit/static")

    python -m roe_core.fit --model embedded --scenes 1000 --out runs/fit
    python -m roe_core.fit --model path/to/llava --llava-json data.json --image-folder images --out runs/fit
    python -m roe_core.fit --model path/to/llava --images photos/ --questions questions.txt --out runs/fit

Signatures:

    fit_parts(loaded: LoadedBase, inputs: Sequence[tuple[PIL.Image | path, str]], out_dir: str | Path,
              cfg: FitConfig | None = None, progress: Callable[[str, int, int], None] | None = None,
              checkpoint: Callable[[], object] | None = None) -> dict
        loaded: runtime.sources.LoadedBase (systems.load_base(...)); it is wrapped, never edited.
        Writes out_dir/roe/ (roe_config.json + roe.safetensors: RoEPipeline.from_base(loaded, parts=...),
        `--roe`), out_dir/static/ (static_config.json + static.safetensors: the fixed path at the same
        mean layers, from the same inputs and stand-ins) and out_dir/fit.json (the summary returned: n
        inputs, seconds per stage, threshold, evidence, held-out agreement with dense, mean and std of
        layers run, stand-ins' explained share per layer, routers' R^2). out_dir/cache/ lets a rerun on
        the same inputs continue where the last one stopped (delete it to start afresh).
        progress(stage, done, total) as work proceeds; checkpoint() between batches (it may raise to
        cancel, or block to lend the model to someone else).
    FitConfig(n_val=96, n_evidence=384, target_agreement=0.9, target_layers=0.0, evidence="taylor", rank=0, ridge=1e-4,
              batch_size=16, max_new_tokens=24, calib_steps=6, seed=0, compare=(), cache=True, base_model="",
              export_answers=False)
    fitted_folders(out_dir) -> {system name: parts folder} of a finished fit ({} when none): pass each as
        load_systems(..., parts=fitted_folders(out)); ROE_DIR / STATIC_DIR name the subfolders, SUMMARY
        the summary file ("fit.json")
    scene_inputs(n: int, split: str = "train", start: int = 0) -> list[(Image, str)]
    llava_inputs(json_path, image_folder=None, limit=None) -> list[(Image, str)]
    folder_inputs(image_folder, questions: path | list[str], limit=None, seed=0) -> list[(Image, str)]

How (details in each module):
1. dense pass (record.py): greedy dense answers for every input, RoE's every-layer path; hooks read
   each layer's input and output at prefill: normal equations per layer, the routers' inputs, Fig. 1's L1.
2. stand-ins (standins.py): per layer the rank-r least-squares map from rmsnorm(h_in) to h_out - h_in,
   written exactly into RoE's SkipAdapter form (rank 2r).
3. evidence (record.py): per example and layer, what replacing that layer by its stand-in costs the
   dense answer ("taylor": first order in its log-likelihood; "residual"; or "l1").
4. routers (routers.py): per layer a ridge regression from what RoE's router reads (the routing tokens)
   to that log cost, in RoE's Router with a bias; 5. the threshold: the most skipping whose routed
   answers equal the dense ones on target_agreement of the held-out inputs (bisection).
6. the fixed path: the layers of least mean cost, as many as RoE skips on average on held-out inputs.
"""
from .core import EVIDENCE, ROE_DIR, STATIC_DIR, SUMMARY, FitConfig, fit_parts, fitted_folders
from .inputs import folder_inputs, llava_inputs, scene_inputs

__all__ = ["EVIDENCE", "ROE_DIR", "STATIC_DIR", "SUMMARY", "FitConfig", "fit_parts", "fitted_folders", "folder_inputs",
           "llava_inputs", "scene_inputs"]
