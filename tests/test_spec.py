import pytest
import torch

from kiln.models.spec import ComponentSpec, Dim, DType, Precision, TensorSpec

BATCH = Dim("batch", 1, 1, 8)
SIDE = Dim("side", 8, 16, 32, multiple_of=8)
SPEC = ComponentSpec(
    name="toy",
    family="test",
    inputs=(
        TensorSpec("x", DType.FLOAT32, (BATCH, 4, SIDE, SIDE)),
        TensorSpec("ids", DType.INT64, (BATCH, 5), value_range=(0, 10)),
    ),
    outputs=(TensorSpec("y", DType.FLOAT32, ("batch", 4, "side", "side")),),
)


def test_dim_validates_its_range():
    with pytest.raises(ValueError):
        Dim("bad", 4, 2, 8)
    with pytest.raises(ValueError):
        Dim("bad", 8, 12, 32, multiple_of=8)


def test_export_size_never_traces_at_one():
    # Exporters specialize size-1 axes as static, so a batch axis is traced at 2.
    assert BATCH.export_size() == 2
    assert SIDE.export_size() == 16


def test_parity_sizes_differ_from_export_sizes():
    export, parity = SPEC.export_sizes(), SPEC.parity_sizes()
    assert all(export[name] != parity[name] for name in export)
    assert SPEC.check_sizes({k: v.shape for k, v in SPEC.sample_inputs(parity).items()}) is None


def test_sample_inputs_follow_dtypes_ranges_and_seed():
    a, b = SPEC.sample_inputs(seed=3), SPEC.sample_inputs(seed=3)
    assert a["x"].shape == (1, 4, 16, 16) and a["x"].dtype == torch.float32
    assert a["ids"].dtype == torch.int64 and int(a["ids"].min()) >= 0 and int(a["ids"].max()) < 10
    assert torch.equal(a["x"], b["x"])


def test_check_sizes_explains_what_is_wrong():
    assert "side=12" in SPEC.check_sizes({"x": (1, 4, 12, 16), "ids": (1, 5)})
    assert "rank" in SPEC.check_sizes({"x": (1, 4, 16), "ids": (1, 5)})
    assert "differs" in SPEC.check_sizes({"x": (1, 4, 16, 24), "ids": (1, 5)})
    assert SPEC.check_sizes({"x": (1, 4, 16, 16)}) == "missing input ids"


def test_round_trip_through_manifest_form():
    again = ComponentSpec.from_dict(SPEC.to_dict())
    assert again.inputs == SPEC.inputs and again.outputs == SPEC.outputs
    assert again.tolerance(Precision.FP32) == SPEC.tolerance(Precision.FP32)


def test_dynamic_axes_name_every_non_fixed_axis():
    assert SPEC.inputs[0].dynamic_axes() == {0: "batch", 2: "side", 3: "side"}
    assert SPEC.outputs[0].dynamic_axes() == {0: "batch", 2: "side", 3: "side"}
