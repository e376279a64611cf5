"""An image upload that hands the studio the uploaded file itself, undecoded.

gr.Image opens every upload with PIL in its preprocess (and converts it to `image_mode`, RGB by default)
before the callback runs: a non-RGB bomb of up to ~179 MP was decoded there, ahead of the studio's own
limits in eval.images.load_image, and PIL's errors showed the server's temp path to the browser.
ChartImage keeps gr.Image's preview and upload widget (same front-end component) but passes the path
of the uploaded file on as is; the callback's load_image checks its header before decoding anything.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

import gradio as gr

from charts.io import atomic_write_bytes
from eval.images import MAX_BYTES


class ChartImage(gr.Image):
    """gr.Image(type="filepath") whose preprocess never decodes: the callback gets the raw file's path."""

    # The browser draws it with gr.Image's own front-end component. No __init__ of its own: gradio builds
    # the component's front-end config from the constructor's signature, so a (*args, **kwargs) one
    # would leave props such as `sources` undefined there and the page would never finish loading.
    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):     # base64 from a client: keep the bytes as sent
            try:
                data = base64.b64decode(payload.url.split(",", 1)[1], validate=False)
            except (IndexError, binascii.Error, ValueError):
                raise gr.Error("the image data sent is not valid base64") from None
            if len(data) > MAX_BYTES:
                raise gr.Error(f"image file is over {MAX_BYTES // 2**20} MB")
            path = Path(self.GRADIO_CACHE) / hashlib.sha256(data).hexdigest()[:20] / "upload"
            return str(atomic_write_bytes(path, data))
        if payload.path is None:
            raise gr.Error("no image was uploaded")
        return str(payload.path)
