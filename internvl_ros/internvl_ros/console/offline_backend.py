"""Offline mode: the model in this process, no ROS. Pick an example or upload an image, ask."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from pathlib import Path

import numpy as np

from internvl_ros.core import GenerationConfig, Pipeline
from internvl_ros.core.errors import ImageDecodeError, InternVLError

from .imaging import decode_upload, example_images, preview_jpeg
from .server import Ask, ConsoleError, History

MAX_UPLOADS = 8  # uploads kept (oldest dropped first); examples are always there


class _Image:
    def __init__(self, label: str, rgb: np.ndarray, kind: str):
        self.label, self.rgb, self.kind = label, rgb, kind
        self.jpeg = preview_jpeg(rgb)


class OfflineBackend:
    mode = "offline"

    def __init__(self, model_dir: str | Path, backend: str = "onnxruntime",
                 provider: str | None = None, num_threads: int | None = None,
                 max_tiles: int = 1, max_new_tokens: int = 128,
                 system_prompt: str | None = None, pipeline: Pipeline | None = None):
        self.model_dir = str(model_dir)
        self.backend_name = backend
        self._pipe = pipeline or Pipeline.from_model_dir(
            model_dir, backend=backend, provider=provider, num_threads=num_threads,
            max_tiles=max_tiles)
        self.max_new_tokens = max_new_tokens
        self.system_prompt = system_prompt
        self._images: OrderedDict[str, _Image] = OrderedDict(
            (k, _Image(label, rgb, "example")) for k, (label, rgb) in example_images().items())
        self._images_lock = threading.Lock()
        self._n_uploads = 0
        self._busy = threading.Lock()
        self._gen = None  # the running Generation
        self._history = History()
        self._stats = {"answers": 0, "failed": 0, "cancelled": 0, "last_ttft_s": 0.0,
                       "last_tokens_per_s": 0.0, "last_error": ""}

    # ------------------------------------------------------------------ page data

    def info(self) -> dict:
        return {"title": f"offline: {Path(self.model_dir).name}", "model_dir": self.model_dir,
                "backend": self.backend_name, "uploads": True}

    def sources(self) -> dict:
        with self._images_lock:
            items = [{"id": k, "label": v.label, "kind": v.kind} for k, v in self._images.items()]
        uploads = [i["id"] for i in items if i["kind"] == "upload"]
        return {"sources": items, "default": uploads[-1] if uploads else items[0]["id"]}

    def _image(self, source: str | None) -> _Image:
        with self._images_lock:
            img = self._images.get(source or "")
        if img is None:
            raise ConsoleError(HTTPStatus.NOT_FOUND, f"no image '{source}': pick an example or "
                                                     "upload one")
        return img

    def frame(self, source: str) -> tuple[bytes, dict]:
        img = self._image(source)
        h, w = img.rgb.shape[:2]
        return img.jpeg, {"label": img.label, "width": w, "height": h}

    def upload(self, data: bytes, content_type: str) -> dict:
        try:
            rgb = decode_upload(data)
        except ImageDecodeError as e:
            raise ConsoleError(HTTPStatus.BAD_REQUEST, f"not a usable image: {e}") from None
        h, w = rgb.shape[:2]
        with self._images_lock:
            self._n_uploads += 1
            key = f"upload-{self._n_uploads}"
            self._images[key] = _Image(f"upload {self._n_uploads} ({w}x{h})", rgb, "upload")
            uploads = [k for k, v in self._images.items() if v.kind == "upload"]
            for old in uploads[:-MAX_UPLOADS]:
                del self._images[old]
        return {"source": key, "width": w, "height": h}

    def history(self, after: int) -> list[dict]:
        return self._history.after(after)

    def status(self) -> dict:
        state = "generating" if self._busy.locked() else "idle"
        values = {"mode": "offline", "backend": self.backend_name, "model": self.model_dir,
                  "state": state, **self._stats}
        return {"level": "OK", "message": state, "name": "offline model",
                "values": [[k, _fmt(v)] for k, v in values.items()], "age_s": 0.0}

    # ------------------------------------------------------------------ asking

    def start_ask(self, prompt: str, source: str | None, max_new_tokens: int = 0) -> Ask:
        ask = Ask(prompt)
        img = self._image(source)
        if not self._busy.acquire(blocking=False):
            ask.finish(False, "busy: another answer is being generated; wait for it or cancel it")
            return ask
        n = max_new_tokens or self.max_new_tokens
        threading.Thread(target=self._run, args=(ask, img, n), daemon=True,
                         name=f"ask-{ask.id}").start()
        return ask

    def _run(self, ask: Ask, img: _Image, max_new_tokens: int) -> None:
        try:
            config = GenerationConfig(max_new_tokens=max_new_tokens)
            gen = self._pipe.generate(ask.prompt, images=[img.rgb],
                                      system_prompt=self.system_prompt, config=config)
            self._gen = gen
            ask.set_canceller(gen.cancel)
            text = ""
            for step in gen:
                text += step.text_delta
                ask.delta(text, step.index + 1)
            res = gen.result
            t = res.timings
            self._stats.update(last_ttft_s=t.ttft_s, last_tokens_per_s=t.decode_tokens_per_s)
            self._stats["cancelled" if res.finish_reason == "cancelled" else "answers"] += 1
            self._history.add(prompt=ask.prompt, text=res.text, source=img.label,
                              finish_reason=res.finish_reason, stamp=time.time(), frame_id="",
                              ttft=t.ttft_s, tokens_per_second=t.decode_tokens_per_s)
            ask.finish(True, "cancelled" if res.finish_reason == "cancelled" else "ok",
                       text=res.text, finish_reason=res.finish_reason, ttft=t.ttft_s,
                       tokens_per_second=t.decode_tokens_per_s, tokens=t.generated_tokens)
        except InternVLError as e:
            self._fail(ask, f"{type(e).__name__}: {e}")
        except Exception as e:  # a bug: report it to the page, keep serving
            self._fail(ask, f"internal error: {type(e).__name__}: {e}")
        finally:
            self._gen = None
            self._busy.release()

    def _fail(self, ask: Ask, message: str) -> None:
        self._stats["failed"] += 1
        self._stats["last_error"] = message
        ask.finish(False, message)

    def close(self) -> None:
        gen = self._gen
        if gen is not None:
            gen.close()  # stops before the next token
        if self._busy.acquire(timeout=10.0):  # never close the sessions under a running step
            self._pipe.close()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
