"""Inputs shared by the serving tests: images, crafted bomb headers, direct (library) encodings."""
from __future__ import annotations

import base64
import contextlib
import io
import socket
import struct
import zlib

import httpx
import torch
from PIL import Image

from alip.model import create_model, export_open_clip, get_tokenizer, image_transform, load_model


def png_bytes(color=(200, 30, 30), size=(80, 60), pattern: int = 0) -> bytes:
    img = Image.new("RGB", size, color)
    if pattern:  # some structure so different images get clearly different embeddings
        for x in range(0, size[0], pattern):
            for y in range(size[1]):
                img.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, and an empty image body: what a
    decompression bomb looks like to a server before decoding (a few dozen bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@torch.no_grad()
def direct_image_embeddings(model, images: list[bytes]) -> torch.Tensor:
    tf = image_transform(model, train=False)
    x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    return model.encode_image(x, normalize=True).float()


@torch.no_grad()
def direct_text_embeddings(model, texts: list[str]) -> torch.Tensor:
    return model.encode_text(get_tokenizer(model)(texts), normalize=True).float()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


@contextlib.contextmanager
def running_service(export_dir, **start_kwargs):
    """A real Ray Serve app over a fresh alip-tiny export in `export_dir`; yields the URL, an HTTP
    client and the same model loaded in-process (the reference the endpoints are compared with)."""
    import ray

    from alip.serving import deployment as serve_app

    torch.manual_seed(0)
    torch.set_num_threads(1)
    export = export_open_clip(create_model("alip-tiny"), export_dir)
    url = serve_app.start(str(export), host="127.0.0.1", port=free_port(), **start_kwargs)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {"url": url, "client": client, "model": load_model(export).eval()}
    finally:
        serve_app.stop()
        ray.shutdown()
