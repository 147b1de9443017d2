"""RoE Explorer's Gradio app: app.ui.build_demo(pipe) is the page; app.py at the repo root launches it."""
import os

# Before gradio is imported anywhere: no analytics thread calling out, and local health checks that
# bypass any proxy the environment sets.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
for _var in ("NO_PROXY", "no_proxy"):
    _hosts = [h for h in os.environ.get(_var, "").split(",") if h]
    os.environ[_var] = ",".join(dict.fromkeys(_hosts + ["localhost", "127.0.0.1"]))
