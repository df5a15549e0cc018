"""The checked-in Open Inference Protocol stubs are current and match the public field numbers."""

from pathlib import Path

from robustgate.protos import generate
from robustgate.protos import open_inference_grpc_pb2 as pb


def test_stubs_are_current(tmp_path: Path):
    generate.generate(tmp_path)
    for name in generate.GENERATED:
        fresh = (tmp_path / name).read_text()
        checked_in = (generate.PROTO_DIR / name).read_text()
        assert fresh == checked_in, f"protos/{name} is stale: run `python -m robustgate.protos.generate`"


def test_field_numbers_follow_the_public_spec():
    fields = pb.InferParameter.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in fields.items()} == {
        "bool_param": 1, "int64_param": 2, "string_param": 3, "double_param": 4, "uint64_param": 5,
    }
    req = pb.ModelInferRequest.DESCRIPTOR.fields_by_name
    assert req["raw_input_contents"].number == 7 and req["outputs"].number == 6
    resp = pb.ModelInferResponse.DESCRIPTOR.fields_by_name
    assert resp["raw_output_contents"].number == 6 and resp["outputs"].number == 5
    contents = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    assert contents["fp32_contents"].number == 6 and contents["uint_contents"].number == 4
    assert pb.DESCRIPTOR.package == "inference"
    assert "GRPCInferenceService" in pb.DESCRIPTOR.services_by_name
