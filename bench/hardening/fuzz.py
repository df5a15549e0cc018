"""Loopback fuzzing campaign: malformed ModelInfer requests against a real robustgate server.

Each case starts from a well-formed request (1..limit Fashion-MNIST-sized items, FP32 or UINT8,
raw or typed contents) and applies 0-3 random mutations: unicode model names, versions and input
names; unknown datatypes; huge, zero, negative, missing and extra dimensions; raw buffers of the
wrong length, extra buffers, raw and typed contents together, typed values in the wrong field or of
the wrong count; NaN, Inf, out-of-range and > 255 values; batches over the limit; extra or missing
inputs; unknown requested outputs; random parameters and ids (harmless); and, for a share of the
cases, byte-level corruption of the serialized message (flips, truncation, insertion). Requests go
over real gRPC as bytes (so corrupt messages reach the server as they are).

Oracle, per case:
- every answer is a status the protocol documents (OK, INVALID_ARGUMENT, NOT_FOUND,
  PERMISSION_DENIED -- a detector's rejection --, RESOURCE_EXHAUSTED) with a non-empty message;
  UNKNOWN, INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED (a hang) or a dropped connection is a crash;
- a case with a defect the codec must catch is refused with that defect's status;
- a case with only harmless mutations is answered OK (or rejected by a detector) with exactly the
  logits ONNX Runtime gives for its images;
after the campaign the server is ready and answers a known request correctly.

    .venv/bin/python bench/hardening/fuzz.py --cases 100000    # starts `robustgate serve`

Writes bench/results/hardening.fuzz.{json,md}. tests/hardening/test_fuzz_campaign.py runs the same
campaign (a few hundred cases) against an in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import numpy as np

from robustgate.protos import open_inference_grpc_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}
DATATYPES = ["FP64", "FP16", "BF16", "INT8", "INT16", "INT32", "INT64", "UINT16", "UINT32", "UINT64", "BOOL",
             "BYTES", "fp32", "uint8", "", "FP32 ", "\u0000", "F\u00d8\u00d832"]
WEIRD = ["", " ", "\u00e9", "\u2603", "\U0001f600" * 3, "\u202e", "tiny\u0000", "../../etc/passwd", "x" * 300,
         "Ｔｉｎｙ", "\ufeff", "input\n"]


@dataclass
class Target:
    """What the server serves (from its ModelMetadata) and how to check a correct answer."""

    model: str
    input_name: str
    item_shape: tuple[int, int, int]
    max_items: int
    images: np.ndarray  # [P, C, H, W] float32 in [0, 1]: the pool valid cases draw from
    reference: Callable[[np.ndarray], np.ndarray]  # x [n, C, H, W] -> logits [n, K]
    outputs: tuple[str, ...] = ("logits", "robustgate_verdict")


@dataclass
class Case:
    payload: bytes
    mutations: list[str]
    expect: set[str] | None  # statuses a defect allows; None: harmless (must be served); "any" mutations: DOCUMENTED
    x: np.ndarray | None = None  # the images of a harmless case
    corrupt: bool = False


@dataclass
class Stats:
    statuses: Counter = field(default_factory=Counter)
    by_mutation: dict = field(default_factory=dict)
    violations: list = field(default_factory=list)
    crashes: int = 0
    mismatches: int = 0
    empty_messages: int = 0
    cases: int = 0

    def record(self, case: Case, status: str) -> None:
        self.cases += 1
        self.statuses[status] += 1
        for m in case.mutations or ["none"]:
            self.by_mutation.setdefault(m, Counter())[status] += 1

    def violation(self, case: Case, status: str, what: str) -> None:
        if len(self.violations) < 50:
            self.violations.append({"mutations": case.mutations, "status": status, "what": what[:500]})


# ---- case generation -----------------------------------------------------------------------
def base_request(t: Target, rng: np.random.Generator) -> tuple[pb.ModelInferRequest, np.ndarray, dict]:
    n = int(rng.integers(1, t.max_items + 1))
    idx = rng.choice(len(t.images), size=n, replace=False)
    x = t.images[idx]  # [n, C, H, W] float32
    datatype = "UINT8" if rng.random() < 0.3 else "FP32"
    raw = rng.random() < 0.7
    req = pb.ModelInferRequest(model_name=t.model)
    tensor = req.inputs.add(name=t.input_name, datatype=datatype, shape=[n, *t.item_shape])
    if datatype == "UINT8":
        u8 = np.round(x * 255).astype(np.uint8)
        x = u8.astype(np.float32) / np.float32(255.0)
        if raw:
            req.raw_input_contents.append(u8.tobytes())
        else:
            tensor.contents.uint_contents.extend(u8.ravel().tolist())
    elif raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return req, x, {"n": n, "datatype": datatype, "raw": raw}


def _param(rng: np.random.Generator, params) -> None:
    key = str(rng.choice(WEIRD + ["priority", "timeout", "binary_data_size", "sequence_id"]))
    kind = int(rng.integers(5))
    p = params[key]
    if kind == 0:
        p.bool_param = bool(rng.integers(2))
    elif kind == 1:
        p.int64_param = int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64))
    elif kind == 2:
        p.string_param = str(rng.choice(WEIRD)) * int(rng.integers(1, 4))
    elif kind == 3:
        p.double_param = float(rng.choice([np.nan, np.inf, -0.0, 1e308, rng.normal()]))
    else:
        p.uint64_param = int(rng.integers(0, 2**63 - 1, dtype=np.int64))


def harmless(req: pb.ModelInferRequest, t: Target, rng: np.random.Generator, info: dict) -> str:
    k = int(rng.integers(5))
    if k == 0:
        req.id = str(rng.choice(WEIRD)) * int(rng.integers(1, 20))
        return "id"
    if k == 1:
        _param(rng, req.parameters)
        return "request parameter"
    if k == 2:
        _param(rng, req.inputs[0].parameters)
        return "input parameter"
    if k == 3:
        req.model_version = "1"
        return "version 1"
    o = req.outputs.add(name=str(rng.choice(t.outputs)))
    _param(rng, o.parameters)
    return "known output"


def defect(req: pb.ModelInferRequest, t: Target, rng: np.random.Generator, info: dict) -> tuple[str, set[str]]:
    """Applies one defect the codec must refuse; returns its name and the statuses it allows."""
    inv, nf = {"INVALID_ARGUMENT"}, {"NOT_FOUND"}
    inp = req.inputs[0] if req.inputs else None
    k = int(rng.integers(20))
    if k == 0:
        req.model_name = str(rng.choice(WEIRD + [t.model + "x", t.model.upper()]))
        return "model name", nf
    if k == 1:
        req.model_version = str(rng.choice(WEIRD[1:] + ["0", "2", "-1", "1 "]))
        return "model version", nf
    if inp is None:
        return "no input", inv
    if k == 2:
        inp.name = str(rng.choice(WEIRD + [t.input_name + "_", "INPUT"]))
        return "input name", inv
    if k == 3:
        inp.datatype = str(rng.choice(DATATYPES))
        return "datatype", inv
    if k == 4:
        d = int(rng.integers(len(inp.shape)))
        inp.shape[d] = int(rng.choice([0, -1, -(2**63), 2**63 - 1, 2**31, min(2**63 - 1, 2**32 + int(inp.shape[d]))]))
        return "huge/zero/negative dim", inv
    if k == 5:
        grow = rng.random() < 0.5
        if len(inp.shape) != 1 + len(t.item_shape):  # an earlier rank defect: move further, never back to a valid rank
            grow = len(inp.shape) > 1 + len(t.item_shape)
        if grow:
            inp.shape.append(int(rng.integers(1, 4)))
        else:
            del inp.shape[int(rng.integers(len(inp.shape)))]
        return "rank", inv
    if k == 6:
        inp.shape[0] = t.max_items + int(rng.integers(1, 3))
        return "batch over limit", inv
    if k == 7:
        req.inputs.add(name=str(rng.choice([t.input_name, "extra"])), datatype="FP32", shape=[1])
        return "second input", inv
    if k == 8:
        del req.inputs[:]
        return "no input", inv
    if k == 9:
        req.outputs.add(name=str(rng.choice(WEIRD + ["probabilities", "features", "robustgate_score_nope"])))
        return "unknown output", inv
    raw = bool(req.raw_input_contents)
    if raw:
        buf = req.raw_input_contents[0]
        if len(buf) < 2 or len(buf) % 4:  # an earlier defect already broke the buffer
            req.raw_input_contents.append(b"")
            return "extra raw buffer", inv
        if k in (10, 11):
            cut = int(rng.integers(1, len(buf)))
            req.raw_input_contents[0] = buf[:-cut] if k == 10 else buf + bytes(rng.integers(0, 256, cut, dtype=np.uint8))
            return "raw length", inv
        if k == 12:
            req.raw_input_contents.append(bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8)))
            return "extra raw buffer", inv
        if k == 13:
            inp.contents.fp32_contents.append(0.5)
            return "raw and typed", inv
        if k in (14, 15, 16) and inp.datatype == "FP32":
            arr = np.frombuffer(buf, "<f4").copy()
            i = int(rng.integers(arr.size))
            arr[i] = {14: rng.choice([np.nan, np.inf, -np.inf]), 15: rng.choice([-1e-3, -1.0, -3.4e38]),
                      16: rng.choice([1.0001, 2.0, 255.0, 3.4e38])}[k]
            req.raw_input_contents[0] = arr.tobytes()
            return {14: "NaN/Inf", 15: "below range", 16: "above range"}[k], inv
        cut = int(rng.integers(1, len(buf)))
        req.raw_input_contents[0] = buf[:-cut]
        return "raw length", inv
    field = "fp32_contents" if inp.datatype == "FP32" else "uint_contents"
    values = getattr(inp.contents, field)
    if not values:  # an earlier defect emptied them
        req.raw_input_contents.append(b"\0" * 4)
        return "raw and typed", inv
    if k in (10, 11):
        if k == 10:
            del values[-int(rng.integers(1, len(values) + 1)):]
        else:
            values.extend([0] * int(rng.integers(1, 50)))
        return "typed count", inv
    if k == 12:
        other = str(rng.choice(["int_contents", "int64_contents", "uint64_contents", "bool_contents", "fp64_contents"]))
        getattr(inp.contents, other).append(1)
        return "typed wrong field", inv
    if k == 13:
        req.raw_input_contents.append(b"\0" * 4)
        return "raw and typed", inv
    i = int(rng.integers(len(values)))
    if field == "fp32_contents":
        values[i] = float(rng.choice([np.nan, np.inf, -0.5, 1.5, 3.4e38]))
        return "typed NaN/range", inv
    values[i] = int(rng.integers(256, 2**32))
    return "uint8 > 255", inv


def corrupt(payload: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(payload)
    for _ in range(int(rng.integers(1, 6))):
        op = int(rng.integers(4))
        if op == 0 and b:
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        elif op == 1 and b:
            del b[int(rng.integers(len(b))):]
        elif op == 2:
            pos = int(rng.integers(len(b) + 1))
            b[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
        elif b:
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
    return bytes(b)


def make_case(t: Target, rng: np.random.Generator) -> Case:
    req, x, info = base_request(t, rng)
    r = rng.random()
    mutations: list[str] = []
    expect: set[str] | None = None
    for _ in range(int(rng.integers(0, 3))):
        mutations.append(harmless(req, t, rng, info))
    if r < 0.15:  # harmless only
        return Case(req.SerializeToString(), mutations, None, x)
    if r < 0.30:  # byte-level corruption of the wire message
        return Case(corrupt(req.SerializeToString(), rng), mutations + ["corrupt bytes"], set(DOCUMENTED), corrupt=True)
    expect = set()
    for _ in range(int(rng.integers(1, 4))):
        name, codes = defect(req, t, rng, info)
        mutations.append(name)
        expect |= codes
    return Case(req.SerializeToString(), mutations, expect)


# ---- running -------------------------------------------------------------------------------
def check(case: Case, status: str, details: str, body: bytes | None, t: Target, stats: Stats) -> None:
    stats.record(case, status)
    if status not in DOCUMENTED:
        stats.crashes += 1
        stats.violation(case, status, f"undocumented status: {details}")
        return
    if status != "OK" and not details:
        stats.empty_messages += 1
        stats.violation(case, status, "status without a message")
    if status == "RESOURCE_EXHAUSTED":  # load, not the request's content: allowed for any case
        return
    if case.expect is not None:
        if status not in case.expect:
            stats.violation(case, status, f"expected one of {sorted(case.expect)}: {details}")
        return
    if status not in ("OK", "PERMISSION_DENIED"):
        stats.violation(case, status, f"a well-formed request was refused: {details}")
        return
    if status == "OK":
        resp = pb.ModelInferResponse.FromString(body)
        names = [o.name for o in resp.outputs]
        i = names.index("logits") if "logits" in names else None
        if i is None:  # only other outputs were requested
            return
        out = resp.outputs[i]
        got = (np.frombuffer(resp.raw_output_contents[i], "<f4") if resp.raw_output_contents
               else np.asarray(out.contents.fp32_contents, np.float32)).reshape(tuple(out.shape))
        want = t.reference(case.x)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
            stats.mismatches += 1
            stats.violation(case, status, "answer differs from the reference logits")


async def run_campaign(url: str, t: Target, cases: int, seed: int = 0, concurrency: int = 8,
                       timeout_s: float = 30.0, credentials: grpc.ChannelCredentials | None = None,
                       progress: Callable[[int], None] | None = None) -> Stats:
    """Sends ``cases`` generated cases with ``concurrency`` workers; returns the tally."""
    stats = Stats()
    rng = np.random.default_rng(seed)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    channel = (grpc.aio.secure_channel(url, credentials, options=options) if credentials
               else grpc.aio.insecure_channel(url, options=options))
    async with channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: corrupt messages go out as they are
        next_case = 0

        async def worker() -> None:
            nonlocal next_case
            while next_case < cases:
                next_case += 1
                case = make_case(t, rng)
                try:
                    body = await call(case.payload, timeout=timeout_s)
                    status, details = "OK", ""
                except grpc.aio.AioRpcError as exc:
                    body, status, details = None, exc.code().name, exc.details() or ""
                check(case, status, details, body, t, stats)
                if progress is not None and stats.cases % 10000 == 0:
                    progress(stats.cases)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return stats


def after_check(url: str, t: Target, credentials: grpc.ChannelCredentials | None = None) -> dict:
    """The server's readiness and one known request's answer after the campaign."""
    from robustgate.protos import open_inference_grpc_pb2_grpc as pb_grpc

    x = t.images[:2]
    req = pb.ModelInferRequest(model_name=t.model)
    req.inputs.add(name=t.input_name, datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    channel = grpc.secure_channel(url, credentials) if credentials else grpc.insecure_channel(url)
    with channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        live = stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        resp = stub.ModelInfer(req, timeout=30)
    i = [o.name for o in resp.outputs].index("logits")
    got = np.frombuffer(resp.raw_output_contents[i], "<f4").reshape(tuple(resp.outputs[i].shape))
    return {"ready": bool(ready), "live": bool(live), "answer_correct": bool(np.allclose(got, t.reference(x), rtol=1e-4, atol=1e-4))}


def summarize(stats: Stats, after: dict) -> dict:
    return {
        "cases": stats.cases, "statuses": dict(stats.statuses), "crashes": stats.crashes,
        "violations": len(stats.violations), "mismatches": stats.mismatches, "empty_messages": stats.empty_messages,
        "first_violations": stats.violations[:20], "after": after,
        "by_mutation": {k: dict(v) for k, v in sorted(stats.by_mutation.items())},
    }


# ---- command line --------------------------------------------------------------------------
def markdown(r: dict) -> str:
    s = r["summary"]
    lines = [
        "# Hardening: loopback fuzzing campaign",
        "",
        f"{s['cases']:,} generated ModelInfer requests (well-formed, harmlessly mutated, defective, or byte-corrupted; "
        f"see bench/hardening/fuzz.py) sent over real gRPC to `robustgate serve` with `{r['config']['serve_config']}` "
        f"(limits.max_batch_items {r['config']['max_items']}), {r['config']['concurrency']} concurrent workers.",
        "",
        f"- Command: `{r['command']}` (server: `{r['server_command']}`)",
        f"- Started {r['started_utc']} UTC, {r['wall_s']:.0f} s ({s['cases'] / r['campaign_s']:.0f} cases/s); "
        f"load average at start {r['loadavg_start']}, at end {r['loadavg_end']} (2 shared cores)",
        f"- Server resident memory {r['rss_start_mib']:.1f} MiB before, {r['rss_end_mib']:.1f} MiB after",
        "",
        "## Result",
        "",
        "| cases | crashes (undocumented status, dropped connection) | oracle violations | wrong answers | "
        "statuses without a message |",
        "| --- | --- | --- | --- | --- |",
        f"| {s['cases']:,} | {s['crashes']} | {s['violations']} | {s['mismatches']} | {s['empty_messages']} |",
        "",
        f"After the campaign: live {s['after']['live']}, ready {s['after']['ready']}, a known request answered "
        f"correctly {s['after']['answer_correct']}; process alive {r['server_alive']}, SIGTERM exit code {r['exit_code']}.",
        "",
        "## Answers by status",
        "",
        "| status | cases |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(s["statuses"].items(), key=lambda kv: -kv[1])]
    lines += ["", "## Answers by mutation (a case may carry several)", "", "| mutation | statuses |", "| --- | --- |"]
    for m, st in s["by_mutation"].items():
        lines.append(f"| {m} | " + ", ".join(f"{k} {v:,}" for k, v in sorted(st.items())) + " |")
    if s["first_violations"]:
        lines += ["", "## First violations", ""] + [f"- {v}" for v in s["first_violations"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # noqa: E402  (bench/ is not a package)
    import onnxruntime as ort

    from robustgate.models.bundle import Bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=common.REPO / "deploy" / "default.yaml")
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-items", type=int, default=8, help="limits.max_batch_items of the fuzzed server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nice", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=common.RESULTS)
    ap.add_argument("--name", default="hardening.fuzz")
    args = ap.parse_args(argv)

    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    load0, t0 = common.loadavg(), time.perf_counter()
    server = common.Serve(args.config, overrides={"limits": {"max_batch_items": args.max_items}}, nice=args.nice)
    try:
        bundle = Bundle.load(common.REPO / server.config["bundle"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(bundle.path(bundle.spec.backbone.onnx)), options, providers=["CPUExecutionProvider"])
        logits_name = bundle.spec.backbone.logits_output
        images, _ = common.test_images(500, seed=args.seed)
        target = Target(model=server.model, input_name=bundle.input.name, item_shape=tuple(bundle.input.shape),
                        max_items=args.max_items, images=images,
                        reference=lambda x: common.served_answers(  # what it answers
                            server.config, sess.run([logits_name], {bundle.input.name: x})[0]))
        rss0 = common.rss_mib(server.pid)
        t1 = time.perf_counter()
        stats = asyncio.run(run_campaign(server.url, target, args.cases, seed=args.seed, concurrency=args.concurrency,
                                         progress=lambda n: print(f"{n} cases", flush=True)))
        campaign_s = time.perf_counter() - t1
        after = after_check(server.url, target)
        rss1 = common.rss_mib(server.pid)
        alive = server.alive()
    finally:
        code = server.stop()
    summary = summarize(stats, after)
    result = {
        "command": ("" if os.nice(0) == 0 else f"nice -n {os.nice(0)} ") + " ".join(["python", *sys.argv]) if argv is None else "fuzz.py " + " ".join(argv),
        "server_command": server.command, "started_utc": started, "wall_s": time.perf_counter() - t0,
        "campaign_s": campaign_s, "loadavg_start": load0, "loadavg_end": common.loadavg(), "machine": common.machine(),
        "config": {"serve_config": str(Path(args.config).resolve().relative_to(common.REPO)), "cases": args.cases,
                   "concurrency": args.concurrency, "max_items": args.max_items, "seed": args.seed},
        "rss_start_mib": rss0, "rss_end_mib": rss1, "server_alive": alive, "exit_code": code, "summary": summary,
    }
    js, md = common.write_results(args.name, result, markdown(result), args.out_dir)
    print(f"wrote {js} and {md}")
    ok = (summary["crashes"] == 0 and summary["violations"] == 0 and after["ready"] and after["answer_correct"]
          and alive and code == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
