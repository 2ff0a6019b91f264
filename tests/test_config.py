import dataclasses
import re

import pytest

from vmoba_compile import Granularity, Partition, Scope, Selection, VideoLayout, VMoBAConfig
from vmoba_compile.config import CUDA_INFERENCE_KERNEL_OPTIONS, CUDA_KERNEL_OPTIONS


def test_defaults_and_string_enums():
    cfg = VMoBAConfig(schedule=["3d", "1D"], selection="topk", scope="head", granularity="token")
    assert cfg.schedule == (Partition.D3, Partition.D1)
    assert cfg.selection is Selection.TOPK
    assert cfg.scope is Scope.HEAD
    assert cfg.granularity is Granularity.TOKEN
    default = VMoBAConfig()
    assert default.schedule == (Partition.D1, Partition.D2, Partition.D3)
    # chosen from the quality study (benchmarks/quality/README.md)
    assert default.scope is Scope.QUERY and default.threshold == 0.4
    assert default.selection is Selection.THRESHOLD and default.block_size == 128


def test_schedule_cycles_over_layers():
    cfg = VMoBAConfig()
    assert [cfg.partition_for(i).value for i in range(7)] == [
        "1d",
        "2d",
        "3d",
        "1d",
        "2d",
        "3d",
        "1d",
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"selection": "top"}, "selection"),
        ({"scope": "global"}, "scope"),
        ({"granularity": "row"}, "granularity"),
        ({"schedule": ()}, "schedule"),
        ({"schedule": ("4d",)}, "schedule"),
        ({"topk": 0}, "topk"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"block_size": 100}, "block_size"),
        ({"block_size": 8}, "block_size"),
        ({"chunk_3d": (2, 0, 2)}, "chunk_3d"),
        ({"target_chunk_blocks": 0}, "target_chunk_blocks"),
        ({"kernel_options": {"BLOCK_M": 1.5}}, "kernel_options"),
        ({"kernel_options": [1, 2]}, "kernel_options"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"VMoBAConfig.{field}"):
        VMoBAConfig(**kwargs)


def test_chunk_wrong_type_is_type_error():
    with pytest.raises(TypeError, match="chunk_2d"):
        VMoBAConfig(chunk_2d=(2, 2, 2))
    assert VMoBAConfig(chunk_1d=3).chunk_1d == (3,)


def test_layout_mismatch_explains_text_tokens():
    lay = VideoLayout(frames=21, height=30, width=52)
    with pytest.raises(ValueError, match=r"has 32760 tokens.*S=32986.*text_tokens=226"):
        lay.check_seq_len(32986)
    VideoLayout(21, 30, 52, text_tokens=226).check_seq_len(32986)


def test_layout_validation():
    with pytest.raises(ValueError, match="frames"):
        VideoLayout(frames=0, height=2, width=2)
    with pytest.raises(ValueError, match="text_position"):
        VideoLayout(2, 2, 2, text_tokens=3, text_position="middle")
    assert VideoLayout(2, 2, 2, 1, "PREFIX").video_start == 1


def test_kernel_options_are_hashable_and_order_free():
    a = VMoBAConfig(kernel_options={"num_warps": 8, "BLOCK_N": 128})
    b = VMoBAConfig(kernel_options=(("BLOCK_N", 128), ("num_warps", 8)))
    assert a == b and hash(a) == hash(b)
    assert a.flex_kernel_options() == {"BLOCK_N": 128, "num_warps": 8}
    assert a.flex_kernel_options("cpu") == {"BLOCK_N": 128, "num_warps": 8}


def test_default_kernel_options_are_per_device_and_empty_means_pytorchs():
    assert VMoBAConfig().flex_kernel_options("cuda") == CUDA_KERNEL_OPTIONS
    inference = VMoBAConfig().flex_kernel_options("cuda", backward=False)
    assert inference == CUDA_INFERENCE_KERNEL_OPTIONS and "PRESCALE_QK" not in CUDA_KERNEL_OPTIONS
    assert VMoBAConfig().flex_kernel_options("cpu") is None
    assert VMoBAConfig(kernel_options={}).flex_kernel_options("cuda") is None
    assert VMoBAConfig(kernel_options={}) != VMoBAConfig()


def test_repr_shows_only_the_fields_that_differ_from_the_defaults():
    assert repr(VMoBAConfig()) == "VMoBAConfig()"
    assert repr(VMoBAConfig(threshold=0.5, kernel="flash")) == (
        "VMoBAConfig(threshold=0.5, kernel='flash')"
    )
    # A field set to its default value is not shown.
    assert repr(VMoBAConfig(threshold=0.4, block_size=128, scope="query")) == "VMoBAConfig()"
    configs = [
        VMoBAConfig(schedule=["2d"], chunk_3d=(1, 2, 2), scope="head", granularity="token"),
        VMoBAConfig(selection="topk", topk=8, block_size=16, target_chunk_blocks=2),
        VMoBAConfig(kernel_options={"USE_TMA": True, "BLOCK_M": 64}, kernel="triton"),
        VMoBAConfig(kernel_options={}, chunk_1d=2, chunk_2d=(2, 4)),
    ]
    for cfg in configs:
        text = repr(cfg)
        assert "\n" not in text, text
        assert eval(text) == cfg, text  # the fields are literals: repr round-trips
        shown = set(re.findall(r"(\w+)=", text))
        differ = {
            f.name
            for f in dataclasses.fields(VMoBAConfig)
            if getattr(cfg, f.name) != getattr(VMoBAConfig(), f.name)
        }
        assert shown == differ, (text, differ)


def test_presets_are_measured_points_of_the_quality_sweeps(monkeypatch):
    """Each preset is a configuration the quality sweeps ran (so its stated quality is a
    measurement), the presets' densities are ordered as their names say, and "fast" keeps
    the defaults' PSNR within 1 dB on every model where both ran."""
    monkeypatch.syspath_prepend("benchmarks/quality")
    from frontier import quality_rows

    from vmoba_compile.config import PRESETS

    assert VMoBAConfig.preset("balanced") == VMoBAConfig()
    measured = quality_rows("benchmarks/quality/results")
    rows = {}
    for name in PRESETS:
        hits = measured.get(VMoBAConfig.preset(name), [])
        assert hits, f"preset {name!r} was never run by benchmarks/quality/evaluate.py"
        rows[name] = {row["source"]: row for row in hits}
    for path in rows["fast"]:
        fast, balanced = rows["fast"][path], rows["balanced"][path]
        quality = rows["quality"].get(path)
        assert fast["mean_density"] < 0.7 * balanced["mean_density"]
        assert fast["psnr_db"] > balanced["psnr_db"] - 1.0
        if quality is not None:
            assert quality["mean_density"] > balanced["mean_density"]
            assert quality["psnr_db"] > balanced["psnr_db"]


def test_preset_overrides_and_unknown_names():
    fast = VMoBAConfig.preset("fast", kernel="triton", threshold=0.3)
    assert fast.schedule == (Partition.D2,) and fast.threshold == 0.3
    assert fast.kernel.value == "triton"
    with pytest.raises(ValueError, match=r"unknown preset 'fastest'.*balanced, fast, quality"):
        VMoBAConfig.preset("fastest")
