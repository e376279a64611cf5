"""Drive an unpacked model.tar.gz the way the Hugging Face inference DLC's model-server worker does.

Run in a fresh interpreter with the unpacked model folder as cwd's neighbour and nothing of the repo on
sys.path (tests/test_toolkit_handler.py starts it):
    python toolkit_mms_driver.py MODEL_DIR CASES.json
For each case (body, content type, accept, env) it builds MMS's binary predict frame, decodes it with MMS's
own `retrieve_msg`, runs `Service.predict` (which calls the toolkit's `HuggingFaceHandlerService.handle`
and encodes with `create_predict_response`) and decodes that reply. Loading goes through MMS's
`MmsModelLoader`, which instantiates the toolkit's handler service and calls its `initialize`: that puts
MODEL_DIR/code first on sys.path, imports `inference` and calls its `model_fn`.
Prints one JSON object: {"modules": {...}, "results": [...]}.
"""
import json
import os
import struct
import sys


def _shim_transformers_5() -> None:
    """The toolkit imports `transformers.file_utils.is_tf_available`, which transformers 5 dropped. The
    endpoint pins transformers 4.57.1 (code/requirements.txt), which has it; the test machine runs the
    studio's transformers 5, so only here the two names are filled in."""
    import transformers.file_utils as file_utils
    from transformers.utils import is_torch_available

    if not hasattr(file_utils, "is_tf_available"):
        file_utils.is_tf_available = lambda: False
        file_utils.is_torch_available = is_torch_available


def _int(value: int) -> bytes:
    return struct.pack("!i", value)


def _buf(data: bytes) -> bytes:
    return _int(len(data)) + data


def predict_frame(body: bytes, content_type: str, accept: str | None) -> bytes:
    """MMS frontend -> worker: b'I', then per request: id, headers (-1 ends), parameters (-1 ends); -1 ends."""
    headers = [(b"Content-Type", content_type.encode())] + ([(b"Accept", accept.encode())] if accept else [])
    frame = b"I" + _buf(b"req-1")
    for name, value in headers:
        frame += _buf(name) + _buf(value)
    frame += _int(-1) + _buf(b"body") + _buf(content_type.encode()) + _buf(body) + _int(-1)
    return frame + _int(-1)


class FrameConn:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def recv(self, n: int) -> bytes:
        out, self.pos = self.data[self.pos:self.pos + n], self.pos + n
        return out


def decode_response(msg: bytes) -> dict:
    """create_predict_response's layout: code, message, then per request id, content type, status,
    phrase, headers, body; -1 ends."""
    pos = 0

    def read_int():
        nonlocal pos
        value = struct.unpack("!i", msg[pos:pos + 4])[0]
        pos += 4
        return value

    def read_buf():
        nonlocal pos
        n = read_int()
        out = msg[pos:pos + n]
        pos += n
        return out

    out = {"code": read_int(), "message": read_buf().decode()}
    read_buf()                                   # request id
    out["content_type"] = read_buf().decode()
    out["status"] = read_int()
    read_buf()                                   # phrase
    for _ in range(read_int()):                  # response headers
        read_buf(), read_buf()
    out["body"] = read_buf().decode("utf-8", "replace")
    return out


def main() -> None:
    model_dir, cases_path = sys.argv[1], sys.argv[2]
    _shim_transformers_5()
    from mms.model_loader import MmsModelLoader
    from mms.protocol.otf_message_handler import create_predict_response, retrieve_msg

    service = MmsModelLoader().load("model", model_dir, "sagemaker_huggingface_inference_toolkit.handler_service",
                                    None, 1)
    import inference                             # the module the handler service imported from code/
    import eval.local
    modules = {"inference": inference.__file__, "eval.local": eval.local.__file__,
               "training_imported": "training" in sys.modules}
    results = []
    for case in json.load(open(cases_path)):
        os.environ.update(case.get("env", {}))
        _, batch = retrieve_msg(FrameConn(predict_frame(case["body"].encode(), case.get("content_type",
                                                        "application/json"), case.get("accept"))))
        results.append(decode_response(bytes(service.predict(batch))))
    # What MMS does with a generator (a streamed output_fn result): 503, whatever the handler meant.
    generator = create_predict_response([(b for b in [b"data: x\n\n"])], {0: "req-2"}, "ok", 200,
                                        service.context)
    modules["generator_reply"] = decode_response(bytes(generator))
    print(json.dumps({"modules": modules, "results": results}))


if __name__ == "__main__":
    main()
