"""A recipe's last steps, `[export]` and `[inference]`: the student exported for serving and its inference cost
measured against the teacher's, so one `dfkd run` goes from teacher to deployable student with its payback.
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")
QUANTIZE = ("", "dynamic")


@dataclass(frozen=True)
class ExportSection:
    """`dfkd export` of the run's student into `RUN/export/`, once per format (`onnx`, `torchscript`,
    `exported-program`); `quantize = "dynamic"` adds an int8 ONNX copy (onnxruntime's dynamic quantization)."""

    formats: tuple[str, ...] = ("onnx",)
    quantize: str = ""

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown or not self.formats or len(set(self.formats)) != len(self.formats):
            raise ValueError(
                f"formats must name each of {', '.join(EXPORT_FORMATS)} at most once, got {list(self.formats)}"
            )
        if self.quantize not in QUANTIZE:
            raise ValueError(f'quantize must be "" or "dynamic", got {self.quantize!r}')
        if self.quantize and "onnx" not in self.formats:
            raise ValueError('quantize = "dynamic" quantizes the ONNX export: add "onnx" to formats')


@dataclass(frozen=True)
class InferenceSection:
    """`dfkd benchmark inference` of the teacher against the run's student, metered into the run's ledger
    (stage `inference-benchmark`): `images` per model and `batch_size` (0: the command's defaults)."""

    images: int = 0
    batch_size: int = 0

    def __post_init__(self) -> None:
        if self.images < 0 or self.batch_size < 0:
            raise ValueError("images and batch_size must be >= 0 (0: the benchmark's defaults)")
        if self.images and self.batch_size and self.images < self.batch_size:
            raise ValueError(f"images ({self.images}) must be at least one batch ({self.batch_size})")
