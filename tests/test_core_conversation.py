"""Conversations -> tokens and spans (what routing tokens read, what is trained), input errors, and
reading user images of any kind (RGB out, readable InputError for what cannot be read)."""
import io
import struct
import zlib

import pytest
import torch
from PIL import Image

from roe_core import InputError, RoEPipeline
from roe_core.runtime.images import load_image
from roe_core.runtime.tiny import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
IMG = "<image>"


def text_of(enc, ids):
    """Exact text of token ids (the tiny tokenizer has one token per character)."""
    return "".join(enc.tokenizer.convert_ids_to_tokens(ids))


TURNS = {
    "single": [("What colour is the circle?", None)],
    "answered": [("What colour is the circle?", "Red.")],
    "two_turns": [("How many circles?", "Two."), ("And squares?", None)],
    "answer_inside_template": [("Which option?", "A"), ("Are you sure?", "S"), ("Why?", None)],   # "ASSISTANT"
    "template_words": [("USER", "ASSISTANT: USER"), ("ASSISTANT:", "USER:"), ("USER: ASSISTANT:", None)],
    "repeated_turns": [("Is it red?", "Yes"), ("Is it red?", "Yes"), ("Is it red?", "Yes")],
    "answer_equals_question": [("yes", "yes"), ("no", None)],
    "multiline_and_spaces": [("  Line one\nline two?  ", "First.\nSecond. "), ("x", None)],
    "empty_answer": [("Say nothing.", ""), ("Now say something.", None)],
}


@pytest.mark.parametrize("has_image", [True, False], ids=["image", "no_image"])
@pytest.mark.parametrize("name", list(TURNS))
def test_spans_decode_back_to_the_exact_strings(tiny, name, has_image):
    enc, turns = tiny.enc, TURNS[name]
    c = enc.encode(turns, has_image=has_image)
    assert text_of(enc, c.input_ids) == enc.render([(q.strip(), a) for q, a in turns], has_image)
    assert c.num_turns == len(turns)
    assert len(c.answer_spans) == sum(a is not None for _, a in turns)
    eos = enc.tokenizer.eos_token_id
    stripped = [(q.strip(), a) for q, a in turns]
    for t, ((q, a), (qs, qe)) in enumerate(zip(stripped, c.question_spans)):
        assert text_of(enc, c.input_ids[qs:qe]) == q
        # located at its own turn, not at an earlier look-alike: everything before it is the turns before
        # it plus this turn's "USER: " (+ image)
        upto = enc.render(stripped[:t] + [("", None)], has_image, generating=False)
        assert text_of(enc, c.input_ids[:qs]) == upto[:-1]
        assert text_of(enc, c.input_ids[:qs]).endswith(f"USER: {IMG * 16}\n" if (t == 0 and has_image) else "USER: ")
        assert set(c.turn_ids[qs:qe]) == {t}
        if a is not None:
            s, e = c.answer_spans[t]
            assert text_of(enc, c.input_ids[s:e - 1]) == a and c.input_ids[e - 1] == eos   # answer + its stop token
            assert text_of(enc, c.input_ids[:s]) == enc.render(stripped[:t] + [(q, None)], has_image, generating=True)
            assert set(c.turn_ids[s:e]) == {t}
    assert c.image_end == c.question_spans[0][0]
    assert set(c.turn_ids[:c.image_end]) == {-1}
    n_img = c.input_ids[:c.image_end].count(enc.image_token_id)
    assert n_img == (16 if has_image else 0) and c.input_ids.count(enc.image_token_id) == n_img


def test_stop_ids_and_image_token(tiny):
    assert tiny.enc.stop_ids == {tiny.enc.tokenizer.eos_token_id}
    assert tiny.enc.image_token == IMG and tiny.enc.num_image_tokens == 16   # (8 / 2) ** 2 patches, CLS dropped


def test_collate_left_pads_and_marks_routing_keys(tiny, images):
    enc = tiny.enc
    convs = [enc.encode([("How many circles?", "Two."), ("And squares?", None)]), enc.encode([("Hi?", None)])]
    for last_turn_only in (True, False):
        b = enc.collate(convs, images[:2], last_turn_only=last_turn_only)
        S = len(convs[0].input_ids)
        assert b.input_ids.shape == (2, S) and b.pixel_values.shape == (2, 3, 8, 8)
        o = S - len(convs[1].input_ids)
        assert not b.token_ok[1, :o].any() and b.token_ok[1, o:].all() and b.token_ok[0].all()
        assert (b.input_ids[1, :o] == enc.tokenizer.pad_token_id).all()
        assert b.input_ids[1, o:].tolist() == convs[1].input_ids
        assert b.image_keys[1].nonzero().flatten().tolist() == list(range(o, o + convs[1].image_end))
        T = 1 if last_turn_only else 2
        assert b.question_keys.shape == (2, T, S)
        q0 = [text_of(enc, b.input_ids[0][b.question_keys[0, t]].tolist()) for t in range(T)]
        assert q0 == (["And squares?"] if last_turn_only else ["How many circles?", "And squares?"])
        assert text_of(enc, b.input_ids[1][b.question_keys[1, 0]].tolist()) == "Hi?"
        assert text_of(enc, b.input_ids[0][b.answer_mask[0]].tolist()) == "Two.</s>"
        assert not b.answer_mask[1].any()
        if last_turn_only:
            assert set(b.turn_ids[b.token_ok].tolist()) <= {-1, 0}


@pytest.mark.parametrize("turns, message", [
    ([], "at least one question"),
    ([("", None)], "empty"),
    ([("   \n ", None)], "empty"),
    ([("What is <image> here?", None)], "image token"),
    ([("Fine?", "yes"), ("look: <image>", None)], "image token"),
    ([("first", None), ("second", None)], "only the last turn"),
    ([("x" * 600, None)], "at most 512"),
    ([("What now?", "y" * 300), ("And?", "z" * 200), ("Last?", None)], "at most 512"),
])
def test_bad_conversations_raise_input_error(tiny, turns, message):
    with pytest.raises(InputError, match=message):
        tiny.enc.encode(turns)


def test_pipeline_input_errors(images):
    pipe = RoEPipeline.load("tiny", device="cpu", fresh=True)
    with pytest.raises(InputError, match="empty"):
        pipe.answer(images[0], "   ")
    with pytest.raises(InputError, match="no image"):
        pipe.answer(None, "What is it?")
    with pytest.raises(InputError, match="512"):
        pipe.answer(images[0], "why? " * 120)
    assert isinstance(InputError("x"), ValueError)


def test_tiny_tokenizer_decodes_back_to_text():
    """Answers are shown with tokenizer.decode; the tiny model's must not come back spaced out."""
    tok = tiny_tokenizer()
    text = "Two red circles, one square.\nYes"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id] + ids + [tok.eos_token_id], skip_special_tokens=True) == text


# --- images -----------------------------------------------------------------------------------------------

def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid little PNG whose header claims width x height (a decompression bomb, 100 bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def gradient16() -> Image.Image:
    a = (torch.arange(64 * 64, dtype=torch.int32).reshape(64, 64) * 16).numpy().astype("uint16")
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    return img


CASES = {
    "RGBA": (lambda: Image.new("RGBA", (10, 6), (255, 0, 0, 0)), "PNG", (255, 255, 255)),   # transparent: white
    "RGBA_opaque": (lambda: Image.new("RGBA", (10, 6), (255, 0, 0, 255)), "PNG", (255, 0, 0)),
    "LA": (lambda: Image.new("LA", (10, 6), (0, 0)), "PNG", (255, 255, 255)),
    "L": (lambda: Image.new("L", (10, 6), 77), "PNG", (77, 77, 77)),
    "1": (lambda: Image.new("1", (10, 6), 1), "PNG", (255, 255, 255)),
    "P": (lambda: Image.new("RGB", (10, 6), (0, 0, 255)).convert("P"), "GIF", (0, 0, 255)),
    "P_transparent": (lambda: Image.new("P", (10, 6), 0), "PNG_T", (255, 255, 255)),
    "I;16": (gradient16, "PNG", (0, 0, 0)),
    "CMYK": (lambda: Image.new("CMYK", (10, 6), (0, 255, 255, 0)), "JPEG", None),
    "CMYK_tiff": (lambda: Image.new("CMYK", (10, 6), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
    "F": (lambda: Image.new("F", (10, 6), 3.5), "TIFF", (0, 0, 0)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("as_path", [False, True], ids=["bytes", "path"])
def test_any_mode_comes_back_rgb(tmp_path, name, as_path):
    make, fmt, corner = CASES[name]
    img = make()
    data = png_bytes(img, "PNG", transparency=0) if fmt == "PNG_T" else png_bytes(img, fmt)
    if as_path:
        (tmp_path / "upload.img").write_bytes(data)
        data = tmp_path / "upload.img"
    out = load_image(data)
    assert out.mode == "RGB" and out.size == img.size
    if corner is not None:
        assert out.getpixel((0, 0)) == corner
    if name == "CMYK":                                   # JPEG is lossy: red-ish
        r, g, b = out.getpixel((0, 0))
        assert r > 200 and g < 60 and b < 60
    if name == "I;16":                                   # 16-bit scaled to 8-bit over its range
        assert out.getpixel((63, 63)) == (255, 255, 255)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in ((0, 255, 0), (255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    out = load_image(buf.getvalue())
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (0, 255, 0)


def test_pil_image_in_and_big_images_downscaled():
    out = load_image(Image.new("RGBA", (5000, 100), (0, 0, 0, 255)))
    assert out.mode == "RGB" and max(out.size) == 4096


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6                                      # rotate 90 degrees when shown
    out = load_image(png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 20)


def test_unreadable_images_raise_input_error(tmp_path):
    good = png_bytes(Image.effect_noise((64, 64), 60).convert("RGB"))
    cases = {
        "garbage": (b"\x00\x01not an image at all" * 20, "not an image"),
        "empty": (b"", "not an image"),
        "truncated": (good[: len(good) // 2], "corrupt or truncated"),
        "header_only": (good[:40], "not an image|corrupt or truncated"),
        "bad_pixels": (good[:60] + bytes(len(good) - 60), "corrupt or truncated"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(InputError, match=message):
            load_image(data)
    (tmp_path / "notes.txt").write_text("hello, I am text\n" * 10)
    with pytest.raises(InputError, match="notes.txt is not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="'missing.png' was not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="was not found"):
        load_image(tmp_path)                              # a folder
    with pytest.raises(InputError, match="limit is 1 MB"):
        load_image(good + bytes(2**20), max_bytes=2**20)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 20_000, 60_000])
def test_decompression_bomb_raises_input_error(side):
    """A 100-byte PNG claiming side x side pixels is refused before decoding, with a readable message.
    (20000^2 is beyond PIL's own bomb limit: PIL raises DecompressionBombError at open.)"""
    with pytest.raises(InputError, match=rf"{side}x{side} pixels|decompression bomb"):
        load_image(png_claiming(side, side))


def test_max_pixels_limit():
    data = png_bytes(Image.new("RGB", (300, 200)))
    assert load_image(data, max_pixels=60_000).size == (300, 200)
    with pytest.raises(InputError, match="300x200 pixels"):
        load_image(data, max_pixels=59_999)
    with pytest.raises(InputError, match="300x200 pixels"):
        load_image(Image.new("RGB", (300, 200)), max_pixels=59_999)
