"""The Fit tab's events: RoE's routers and adapters, and the fixed path, fitted to the loaded base on the
generated scenes or an uploaded LLaVA JSON (roe_core.fit does the work), then made live on this page for
everyone: the systems built over the fitted parts replace the "not fitted" ones (or the earlier fit) in the
app's context, and the parts are offered as a zip. Background work with a progress bar; between its batches
anyone waiting (a plain question, another user's speed measurement) goes first, since a fit takes minutes;
Stop or Cancel ends it at its next batch."""
from __future__ import annotations

import tempfile
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr

from roe_core import InputError
from roe_core.systems import registry

from . import texts as T
from .background import AppContext, background_task, owner_of
from .handlers_explore import uploaded_json
from .inputs import default_thresholds


def fit_config(n: int, max_new_tokens: int):
    """The fit's settings for n inputs: a quarter of them (at most 96) held out to choose the threshold, the
    dense answers as long as this page's answers; no activation cache (each fit gets a fresh folder)."""
    from roe_core.fit import FitConfig
    return FitConfig(n_val=min(96, max(1, n // 4)), max_new_tokens=max_new_tokens, cache=False)


def zip_parts(out: Path, paths: list[str]) -> str:
    """The fitted parts' folders and the summary, as one zip beside the fit's folder (paths relative to it)."""
    archive = out.parent / f"roe-parts-{out.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for p in map(Path, paths):
            for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
                z.write(f, f.relative_to(out))
    return str(archive)


class FitHandlers:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.running = threading.Lock()      # one fit at a time: the model is one

    def inputs(self, source: str, n: int, files) -> list:
        """(image, question) pairs: questions about generated scenes of the train split (never the test
        split the atlas and the sweep score on), or the uploaded LLaVA JSON's (its answers unused)."""
        from roe_core.fit import llava_inputs, scene_inputs

        n = max(2, int(n))
        if source == "upload":
            pairs = llava_inputs(uploaded_json(files, self.ctx.workdir), limit=n)
        else:
            pairs = scene_inputs(n, split="train")
        if len(pairs) < 2:
            raise InputError(f"a fit needs at least 2 inputs; found {len(pairs)}")
        return pairs

    @background_task("fit_md", stopped="_The fit was cancelled: nothing changed on this page._",
                     failed="Could not fit")
    def fit(self, source: str, n: int, files, request: gr.Request = None, progress=gr.Progress()):
        """Fits RoE (routers and adapters) and the fixed path to the loaded model on `n` inputs, from the
        model's own answers; once done every tab routes with them, and the parts come as a zip.

        Args:
            source: "scenes" (generated scenes of the train split) or "upload" (a LLaVA JSON file with its
                images, in files; its answers are not used)
            n: how many inputs, at most
            files: for source="upload": the LLaVA JSON file and the images it names
        Returns:
            a summary, the fit's own summary (JSON), the parts as a zip, the page's new header, the systems
            Side by side offers, What if's threshold and the sweep's thresholds
        """
        from roe_core.fit import SUMMARY, fit_parts, fitted_folders

        ctx = self.ctx
        loaded = getattr(ctx.pipe, "loaded", None)
        if loaded is None:
            raise InputError("this page's RoE was not built over a loaded base (Pipeline.from_base): nothing to fit")
        if not self.running.acquire(blocking=False):
            raise InputError(T.FIT_RUNNING)
        try:
            inputs = self.inputs(source, n, files)
            (ctx.workdir / "fits").mkdir(exist_ok=True)
            out = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=ctx.workdir / "fits"))
            t0 = time.perf_counter()
            with ctx.job(request) as job:
                progress((0, len(inputs)), desc="starting", unit="steps")
                summary = fit_parts(loaded, inputs, out, cfg=fit_config(len(inputs), ctx.max_new_tokens),
                                    progress=lambda stage, done, total: progress((done, total), desc=str(stage),
                                                                                 unit="steps"),
                                    checkpoint=job.turn)   # between batches: anyone waiting goes first
            seconds = time.perf_counter() - t0
            folders = fitted_folders(out)
            live = self.go_live(loaded, folders, len(inputs))
            archive = zip_parts(out, [*folders.values(), str(out / SUMMARY)])
        finally:
            self.running.release()
        roe = live["roe"]
        held = summary.get("val_mean_layers"), summary.get("val_agreement"), summary.get("n_val")
        md = (f"**Fitted on {len(inputs)} inputs in {seconds:.0f} s**: {', '.join(p.label for p in live.values())} "
              f"now answer on every tab of this page (router threshold {roe.threshold:.2f}"
              + (f"; on the {held[2]} held-out inputs RoE ran {held[0]:.1f} of {ctx.num_layers} layers on average "
                 f"and answered as every layer on {held[1]:.0%} of them" if None not in held else "")
              + "). Download the parts below; `python app.py --model <this model> --roe <folder>/roe --static "
                "<folder>/static` loads them.")
        return {"fit_md": md, "fit_json": summary, "fit_zip": archive, **self.page_views()}

    def go_live(self, loaded, folders: dict[str, str], n: int) -> dict:
        """The systems over the fitted parts ({system: folder}) replace their predecessors in the app's
        context (in-flight work keeps the one it started with); returns them by name."""
        ctx, live = self.ctx, {}
        if "roe" not in folders:
            raise RuntimeError("the fit wrote no RoE parts")
        for name, folder in folders.items():
            if name != "roe" and name not in ctx.systems:       # not loaded on this page (--systems)
                continue
            pipe = registry.get(name).pipeline_class().from_base(loaded, folder)
            old = ctx.systems.get(name)
            pipe.use_engine(old.info.get("engine", "auto") if old is not None else "auto")
            pipe.info["parts"] = f"fitted here on {n} inputs"
            live[name] = pipe
        ctx.systems.update(live)
        ctx.pipe = live["roe"]
        return live

    def page_views(self) -> dict:
        """What a fit changes on the page: the header, Side by side's systems, the thresholds."""
        ctx = self.ctx
        return {"header": header(ctx), "systems_pick": gr.CheckboxGroup(**systems_choices(ctx)),
                "threshold": ctx.pipe.threshold,
                "sweep_thresholds": ", ".join(f"{t:.2f}" for t in default_thresholds(ctx.pipe.threshold))}

    def cancel(self, request: gr.Request = None):
        """Cancel: this user's fit (and other background work) ends at its next checkpoint."""
        n = self.ctx.server.cancel(owner_of(request), questions=False) if owner_of(request) is not None else 0
        return {"fit_md": "_Cancelling: the fit stops at its next step…_" if n else "_Nothing to cancel._"}


def systems_choices(ctx: AppContext) -> dict:
    """Side by side's systems: every loaded one, those not fitted marked so and left unticked."""
    return {"choices": [(p.label + (f" ({T.NOT_FITTED})" if p.needs_fit else ""), n) for n, p in ctx.systems.items()],
            "value": [n for n, p in ctx.systems.items() if not p.needs_fit]}


def header(ctx: AppContext) -> str:
    """The page's header line, from what is loaded now (a fit changes it)."""
    others = [(p.label, p.info) for n, p in ctx.systems.items() if p.refuses_untrained and n != ctx.pipe.system]
    return f"## {T.TITLE} · Routing Experts, layer by layer\n{T.header_markdown(ctx.pipe.info, others)}"
