"""RoE Explorer's Gradio app; app.py at the repo root launches it. The rooms, in the order a request meets them:

    layout.py            build_demo(pipe): the page in page order (header; tabs Chat, Side by side, What if,
                         Explore), every component named, and the events wired by name
    handlers_chat.py     the Chat tab's events (ask, retry, undo, stop, images, speed, export)
    handlers_compare.py  What if and Side by side
    handlers_explore.py  Explore: route atlas, adapter fidelity, trade-off sweep, batch composition, image edits
    handlers_fit.py      Fit: RoE and the fixed path fitted to the loaded model (roe_core.fit), live on the page
    api.py               the endpoints for programs (/answer, the MCP tools) and their list
    background.py        AppContext and the one helper for background work on the shared model
    views.py             what the page shows about a conversation's last turn, by output name
    figures.py, figures_explore.py   plotly figures: traces and plain data in, figures out
    texts.py             the page's words; inputs.py: uploads, JSON, routes, thresholds checked; problems shown
    session.py           one user's Conversation (a value in gr.State) and its export
    examples.py, loadtest.py         the examples gallery; a load test against a running app
"""
import os

# Before gradio is imported anywhere: no analytics thread calling out, and local health checks that
# bypass any proxy the environment sets.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
for _var in ("NO_PROXY", "no_proxy"):
    _hosts = [h for h in os.environ.get(_var, "").split(",") if h]
    os.environ[_var] = ",".join(dict.fromkeys(_hosts + ["localhost", "127.0.0.1"]))
