"""app.py --mcp: gradio's MCP server offers exactly two tools, answer and atlas, over the real MCP
protocol; the other endpoints stay callable by gradio_client (undocumented)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import app  # noqa: F401  (environment before gradio)

pytest.importorskip("mcp")
pytestmark = [pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def url(free_port):
    from app.layout import build_demo, launch_options
    from roe_core.systems import load_systems

    pipe = load_systems(["roe"], model="tiny", fresh=True)["roe"]
    demo = build_demo(pipe, max_new_tokens=4, speed_repeats=1, systems={"roe": pipe}, mcp=True)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_port=free_port(), quiet=True, mcp_server=True,
                                  **launch_options())
    yield local_url
    demo.close()


def test_the_mcp_server_offers_answer_and_atlas(url):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    schema = httpx.get(f"{url}gradio_api/mcp/schema", timeout=30).json()
    names = {t["name"] if isinstance(t, dict) and "name" in t else t for t in schema} if isinstance(schema, list) \
        else set(schema)
    assert names == {"answer_json", "atlas"}

    async def tools():
        async with streamable_http_client(f"{url}gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                listed = await session.list_tools()
                return {t.name: t for t in listed.tools}
    listed = asyncio.run(tools())
    assert set(listed) == {"answer_json", "atlas"}
    assert "route" in json.dumps(listed["answer_json"].inputSchema)
    assert "decoder" in listed["answer_json"].description


def test_other_endpoints_stay_callable(url):
    from pathlib import Path

    from gradio_client import Client, handle_file

    image = Path(__file__).resolve().parent.parent / "assets" / "examples" / "3-count.png"
    c = Client(url, verbose=False)
    out = c.predict(handle_file(str(image)), "How many?", api_name="/ask")
    assert out[0] == "" and out[2]["turn"] == 1               # /ask is undocumented, not gone
