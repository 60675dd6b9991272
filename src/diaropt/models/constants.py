"""The models' fixed numbers, importable without torch (the ONNX Runtime / Core ML run path needs them).

Segmentation (pyannote segmentation-3.0): 10 s chunks at 16 kHz -> 589 frames of 7 powerset classes
over 3 local speakers. Embedding networks: each known name's embedding size, its fbank framing
(Kaldi ``snip_edges=True``: 25 ms windows every 10 ms) and the geometry of its trunk output, so
a model's I/O shapes are known without building it (``variants.fusion_plan``). The torch modules
(``models.segmentation``, ``models.embedding``, ...) re-export these names and tests check that
their forward passes produce these shapes (``tests/test_startup.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FrameTiming:
    """Output frame grid of the segmentation model, relative to the chunk start (seconds)."""

    start_s: float = 0.0
    duration_s: float = 0.0619375
    step_s: float = 0.016875


SEGMENTATION_FRAMES = FrameTiming()
CHUNK_DURATION_S = 10.0
SAMPLE_RATE_HZ = 16000
NUM_LOCAL_SPEAKERS = 3
NUM_POWERSET_CLASSES = 7
CHUNK_SAMPLES = int(CHUNK_DURATION_S * SAMPLE_RATE_HZ)


def segmentation_num_frames(num_samples: int) -> int:
    """Frames PyanNet produces for a chunk of ``num_samples`` (589 for 160000): SincNet's stride-10
    251-tap filterbank, then max-pool 3, conv 5, max-pool 3, conv 5, max-pool 3."""
    frames = (num_samples - 251) // 10 + 1
    for kernel in (None, 5, 5):
        if kernel is not None:
            frames = frames - kernel + 1
        frames //= 3
    return frames


NUM_FRAMES = segmentation_num_frames(CHUNK_SAMPLES)


def num_fbank_frames(num_samples: int, frame_length: int = 400, frame_shift: int = 160) -> int:
    """Frames Kaldi produces with snip_edges=True (998 for 160000 samples)."""
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


@dataclass(frozen=True)
class EmbeddingGeometry:
    """What an embedding network's I/O shapes depend on (samples at ``SAMPLE_RATE_HZ``).

    ``time_stride``: fbank frames per trunk frame (every stride-2 stage halves with padding, so the
    trunk has ``ceil(fbank_frames / time_stride)`` frames); ``trunk_channels``: channels of the trunk
    output (``frame_features``, before the masked statistics pooling).
    """

    embedding_dim: int
    time_stride: int
    trunk_channels: int
    asset_key: str | None = None  # pinned weights; None: the user brings a checkpoint
    frame_length: int = 400  # 25 ms
    frame_shift: int = 160  # 10 ms

    def num_fbank_frames(self, num_samples: int) -> int:
        return num_fbank_frames(num_samples, self.frame_length, self.frame_shift)

    def trunk_frames(self, num_samples: int) -> int:
        return -(-self.num_fbank_frames(num_samples) // self.time_stride)

    @property
    def frame_hop_samples(self) -> int:
        """Samples between two trunk frames."""
        return self.frame_shift * self.time_stride


EMBEDDING_GEOMETRY: dict[str, EmbeddingGeometry] = {
    # CAM++: one stride-2 TDNN; 512 channels after the dense blocks and transits
    "campplus": EmbeddingGeometry(192, time_stride=2, trunk_channels=512, asset_key="campplus"),
    # WeSpeaker ResNet34: three stride-2 stages; 256 channels x 80 / 8 mel bins flattened
    "wespeaker_resnet34": EmbeddingGeometry(256, time_stride=8, trunk_channels=256 * 80 // 8),
}
