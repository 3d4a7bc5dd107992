"""The HLO reader behind compile reports: hand-written HLO text for its rules, tiny TPU programs compiled here."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bbsmall_jax.aot.hlo_analysis import Collective, analyze

MiB = 2**20

SLICED = """HloModule sliced, is_scheduled=true

%fused_slice (param_0: f32[64,1024], param_1: s32[]) -> f32[1,1024] {
  %param_0 = f32[64,1024]{1,0:T(8,128)} parameter(0)
  %param_1 = s32[]{:T(128)S(6)} parameter(1)
  %constant.1 = s32[]{:T(128)} constant(0)
  ROOT %dynamic-slice.1 = f32[1,1024]{1,0:T(1,128)} dynamic-slice(%param_0, %param_1, %constant.1), dynamic_slice_sizes={1,1024}
}

%fused_overlap (param_0.5: f32[64,1024]) -> f32[48,1024] {
  %param_0.5 = f32[64,1024]{1,0:T(8,128)} parameter(0)
  %head = f32[48,1024]{1,0:T(8,128)} slice(%param_0.5), slice={[0:48], [0:1024]}
  %tail = f32[48,1024]{1,0:T(8,128)} slice(%param_0.5), slice={[16:64], [0:1024]}
  ROOT %sum.5 = f32[48,1024]{1,0:T(8,128)} add(%head, %tail)
}

ENTRY %main (table: f32[64,1024], index: s32[]) -> (f32[1,1024], f32[48,1024], f32[8,1024]) {
  %table = f32[64,1024]{1,0:T(8,128)} parameter(0)
  %index = s32[]{:T(128)S(6)} parameter(1)
  %row = f32[1,1024]{1,0:T(1,128)} fusion(%table, %index), kind=kLoop, calls=%fused_slice
  %overlap = f32[48,1024]{1,0:T(8,128)} fusion(%table), kind=kLoop, calls=%fused_overlap
  %slice-start = ((f32[64,1024]{1,0:T(8,128)}), f32[8,1024]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%table), slice={[0:8], [0:1024]}
  %slice-done = f32[8,1024]{1,0:T(8,128)S(1)} slice-done(%slice-start)
  ROOT %rows = (f32[1,1024]{1,0:T(1,128)}, f32[48,1024]{1,0:T(8,128)}, f32[8,1024]{1,0:T(8,128)S(1)}) tuple(%row, %overlap, %slice-done)
}
"""

# A [16, 512, 128] bf16 cache updated one row per iteration by an in-place fusion; the row sits in VMEM (S(1)).
CACHE = """HloModule cache, is_scheduled=true

%fused_update (param_0.1: bf16[16,512,128], param_1.1: bf16[1,512,128], param_2.1: s32[]) -> bf16[16,512,128] {
  %param_0.1 = bf16[16,512,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1.1 = bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)} parameter(1)
  %param_2.1 = s32[]{:S(6)} parameter(2)
  %constant.2 = s32[]{:S(6)} constant(0)
  ROOT %dynamic-update-slice.1 = bf16[16,512,128]{2,1,0:T(8,128)(2,1)} dynamic-update-slice(%param_0.1, %param_1.1, %param_2.1, %constant.2, %constant.2)
}

%body (state: (s32[], bf16[16,512,128], bf16[1,512,128])) -> (s32[], bf16[16,512,128], bf16[1,512,128]) {
  %state = (s32[]{:S(6)}, bf16[16,512,128]{2,1,0:T(8,128)(2,1)}, bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)}) parameter(0)
  %i = s32[]{:S(6)} get-tuple-element(%state), index=0
  %cache = bf16[16,512,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%state), index=1
  %row = bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)} get-tuple-element(%state), index=2
  %update = bf16[16,512,128]{2,1,0:T(8,128)(2,1)} fusion(%cache, %row, %i), kind=kLoop, calls=%fused_update
  %one = s32[]{:S(6)} constant(1)
  %copy.1 = s32[]{:S(6)} copy(%i)
  %next = s32[]{:S(6)} add(%copy.1, %one)
  ROOT %out = (s32[]{:S(6)}, bf16[16,512,128]{2,1,0:T(8,128)(2,1)}, bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)}) tuple(%next, %update, %row)
}

%cond (state.1: (s32[], bf16[16,512,128], bf16[1,512,128])) -> pred[] {
  %state.1 = (s32[]{:S(6)}, bf16[16,512,128]{2,1,0:T(8,128)(2,1)}, bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)}) parameter(0)
  %i.1 = s32[]{:S(6)} get-tuple-element(%state.1), index=0
  %n = s32[]{:S(6)} constant(16)
  ROOT %lt = pred[]{:S(6)} compare(%i.1, %n), direction=LT
}

ENTRY %main.2 (cache.1: bf16[16,512,128], row.1: bf16[1,512,128]) -> bf16[16,512,128] {
  %cache.1 = bf16[16,512,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  %row.1 = bf16[1,512,128]{2,1,0:T(8,128)(2,1)} parameter(1)
  %copy-start = (bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)}, bf16[1,512,128]{2,1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%row.1)
  %copy-done = bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %zero = s32[]{:S(6)} constant(0)
  %copy.2 = s32[]{:S(6)} copy(%zero)
  %init = (s32[]{:S(6)}, bf16[16,512,128]{2,1,0:T(8,128)(2,1)}, bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)}) tuple(%copy.2, %cache.1, %copy-done)
  %loop = (s32[]{:S(6)}, bf16[16,512,128]{2,1,0:T(8,128)(2,1)}, bf16[1,512,128]{2,1,0:T(8,128)(2,1)S(1)}) while(%init), condition=%cond, body=%body
  ROOT %result = bf16[16,512,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%loop), index=1
}
"""
CACHE_ROW = 512 * 128 * 2
# The condition's bound from the loop state instead of a constant: only the compiler can know the trip count.
CACHE_NO_COUNTER = CACHE.replace("%n = s32[]{:S(6)} constant(16)",
                                 "%n = s32[]{:S(6)} get-tuple-element(%state.1), index=0")

COLLECTIVES = """HloModule collectives, is_scheduled=true, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%all-reduce-scatter (input: f32[1024,256]) -> f32[256,256] {
  %input = f32[1024,256]{1,0:T(8,128)} parameter(0)
  %all-reduce.1 = f32[1024,256]{1,0:T(8,128)} all-reduce(%input), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  %partition-id = u32[] partition-id()
  %c256 = u32[] constant(256)
  %offset = u32[] multiply(%partition-id, %c256)
  %zero.1 = u32[] constant(0)
  ROOT %dynamic-slice.2 = f32[256,256]{1,0:T(8,128)} dynamic-slice(%all-reduce.1, %offset, %zero.1), dynamic_slice_sizes={256,256}
}

%wrapped_reduce_scatter (arg: f32[1024,256]) -> f32[256,256] {
  %arg = f32[1024,256]{1,0:T(8,128)} parameter(0)
  ROOT %reduce-scatter.1 = f32[256,256]{1,0:T(8,128)} reduce-scatter(%arg), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}

%split (p: f32[1024,256]) -> (f32[512,256], f32[8,256]) {
  %p = f32[1024,256]{1,0:T(8,128)} parameter(0)
  %top = f32[512,256]{1,0:T(8,128)} slice(%p), slice={[0:512], [0:256]}
  %rows = f32[8,256]{1,0:T(8,128)} slice(%p), slice={[512:520], [0:256]}
  ROOT %pieces = (f32[512,256]{1,0:T(8,128)}, f32[8,256]{1,0:T(8,128)}) tuple(%top, %rows)
}

ENTRY %main.3 (param: f32[1024,256]) -> (f32[4096,256], f32[256,256], f32[256,256], (f32[512,256], f32[8,256])) {
  %param = f32[1024,256]{1,0:T(8,128)} parameter(0)
  %all-gather-start = (f32[1024,256]{1,0:T(8,128)}, f32[4096,256]{1,0:T(8,128)}) all-gather-start(%param), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %all-gather-done = f32[4096,256]{1,0:T(8,128)} all-gather-done(%all-gather-start)
  %fusion.1 = f32[256,256]{1,0:T(8,128)} fusion(%param), kind=kCustom, calls=%all-reduce-scatter
  %rs-start = ((f32[1024,256]{1,0:T(8,128)}), f32[256,256]{1,0:T(8,128)}, s32[]) async-start(%param), calls=%wrapped_reduce_scatter
  %rs-done = f32[256,256]{1,0:T(8,128)} async-done(%rs-start)
  %fusion.2 = (f32[512,256]{1,0:T(8,128)}, f32[8,256]{1,0:T(8,128)}) fusion(%param), kind=kLoop, calls=%split
  ROOT %out = (f32[4096,256]{1,0:T(8,128)}, f32[256,256]{1,0:T(8,128)}, f32[256,256]{1,0:T(8,128)}, (f32[512,256]{1,0:T(8,128)}, f32[8,256]{1,0:T(8,128)})) tuple(%all-gather-done, %fusion.1, %rs-done, %fusion.2)
}
"""

# TPU's async collective fusions: a start, a fusion that computes while carrying the all-gather along, a done.
BF16_TILED = "{1,0:T(8,128)(2,1)}"
ASYNC = """HloModule async_collectives, is_scheduled=true, num_partitions=4

%gather_start (param_0.1: bf16[128,512]) -> (bf16[128,512], bf16[512,512], u32[]) {
  %param_0.1 = bf16[128,512]LAYOUT parameter(0)
  %all-gather.1 = bf16[512,512]LAYOUT all-gather(%param_0.1), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  ROOT %custom-call.1 = (bf16[128,512]LAYOUT, bf16[512,512]LAYOUT, u32[]{:S(2)}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%continuing (param_0.2: bf16[128,512], param_1.2: bf16[512,512], param_2.2: u32[], param_3.2: f32[64,512]) -> (f32[64,512], bf16[128,512], bf16[512,512], bf16[512,512], u32[]) {
  %param_3.2 = f32[64,512]{1,0:T(8,128)} parameter(3)
  %exp = f32[64,512]{1,0:T(8,128)} exponential(%param_3.2)
  %param_0.2 = bf16[128,512]LAYOUT parameter(0)
  %param_1.2 = bf16[512,512]LAYOUT parameter(1)
  %all-gather.2 = bf16[512,512]LAYOUT all-gather(%param_0.2), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  %param_2.2 = u32[]{:S(2)} parameter(2)
  ROOT %tuple.2 = (f32[64,512]{1,0:T(8,128)}, bf16[128,512]LAYOUT, bf16[512,512]LAYOUT, bf16[512,512]LAYOUT, u32[]{:S(2)}) tuple(%exp, %param_0.2, %param_1.2, %all-gather.2, %param_2.2)
}

%gather_done (param_0.3: bf16[128,512], param_1.3: bf16[512,512], param_2.3: u32[]) -> bf16[512,512] {
  %param_0.3 = bf16[128,512]LAYOUT parameter(0)
  %param_1.3 = bf16[512,512]LAYOUT parameter(1)
  %all-gather.3 = bf16[512,512]LAYOUT all-gather(%param_0.3), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
  %param_2.3 = u32[]{:S(2)} parameter(2)
  ROOT %custom-call.3 = bf16[512,512]LAYOUT custom-call(%param_0.3, %param_1.3, %all-gather.3, %param_2.3), custom_call_target="AsyncCollectiveDone"
}

ENTRY %main.6 (shard: bf16[128,512], x.6: f32[64,512]) -> (f32[64,512], bf16[512,512]) {
  %shard = bf16[128,512]LAYOUT parameter(0)
  %x.6 = f32[64,512]{1,0:T(8,128)} parameter(1)
  %async-collective-start = (bf16[128,512]LAYOUT, bf16[512,512]LAYOUT, u32[]{:S(2)}) fusion(%shard), kind=kCustom, output_to_operand_aliasing={{0}: (0, {})}, calls=%gather_start
  %gte.1 = bf16[128,512]LAYOUT get-tuple-element(%async-collective-start), index=0
  %gte.2 = bf16[512,512]LAYOUT get-tuple-element(%async-collective-start), index=1
  %gte.3 = u32[]{:S(2)} get-tuple-element(%async-collective-start), index=2
  %fusion.6 = (f32[64,512]{1,0:T(8,128)}, bf16[128,512]LAYOUT, bf16[512,512]LAYOUT, bf16[512,512]LAYOUT, u32[]{:S(2)}) fusion(%gte.1, %gte.2, %gte.3, %x.6), kind=kOutput, output_to_operand_aliasing={{1}: (0, {}), {2}: (1, {}), {3}: (1, {}), {4}: (2, {})}, calls=%continuing
  %y.6 = f32[64,512]{1,0:T(8,128)} get-tuple-element(%fusion.6), index=0
  %gte.4 = bf16[128,512]LAYOUT get-tuple-element(%fusion.6), index=1
  %gte.5 = bf16[512,512]LAYOUT get-tuple-element(%fusion.6), index=2
  %gte.6 = u32[]{:S(2)} get-tuple-element(%fusion.6), index=4
  %async-collective-done = bf16[512,512]LAYOUT fusion(%gte.4, %gte.5, %gte.6), kind=kCustom, output_to_operand_aliasing={{}: (1, {})}, calls=%gather_done
  ROOT %out.6 = (f32[64,512]{1,0:T(8,128)}, bf16[512,512]LAYOUT) tuple(%y.6, %async-collective-done)
}
""".replace("LAYOUT", BF16_TILED)

HOST = """HloModule host, is_scheduled=true

%host_body (s: (s32[], f32[256])) -> (s32[], f32[256]) {
  %s = (s32[], f32[256]{0}) parameter(0)
  %k = s32[] get-tuple-element(%s), index=0
  %v = f32[256]{0} get-tuple-element(%s), index=1
  %cb = f32[256]{0} custom-call(%v), custom_call_target="xla_ffi_python_cpu_callback"
  %kernel = f32[256]{0} custom-call(%cb), custom_call_target="tpu_custom_call"
  %one.1 = s32[] constant(1)
  %k1 = s32[] add(%k, %one.1)
  ROOT %t = (s32[], f32[256]{0}) tuple(%k1, %kernel)
}

%host_cond (s.1: (s32[], f32[256])) -> pred[] {
  %s.1 = (s32[], f32[256]{0}) parameter(0)
  %k.1 = s32[] get-tuple-element(%s.1), index=0
  %three = s32[] constant(3)
  ROOT %more = pred[] compare(%three, %k.1), direction=GT
}

%small (a: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  ROOT %neg = f32[256]{0} negate(%a)
}

%large (b: f32[256]) -> f32[256] {
  %b = f32[256]{0} parameter(0)
  %square = f32[256]{0} multiply(%b, %b)
  ROOT %total = f32[256]{0} add(%square, %b)
}

ENTRY %main.4 (x: f32[256], flag: pred[]) -> f32[256] {
  %x = f32[256]{0} parameter(0)
  %flag = pred[] parameter(1)
  %zero.2 = s32[] constant(0)
  %init.1 = (s32[], f32[256]{0}) tuple(%zero.2, %x)
  %loop.1 = (s32[], f32[256]{0}) while(%init.1), condition=%host_cond, body=%host_body
  %y = f32[256]{0} get-tuple-element(%loop.1), index=1
  %to_host = f32[256]{0:S(5)} copy(%y)
  %buffer = f32[256]{0} custom-call(), custom_call_target="AllocateBuffer"
  ROOT %branch = f32[256]{0} conditional(%flag, %y, %y), true_computation=%large, false_computation=%small
}
"""

TILED = """HloModule tiled

ENTRY %main.5 (x.5: bf16[256,48,16,32]) -> bf16[256,48,16,32] {
  %x.5 = bf16[256,48,16,32]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  ROOT %transposed = bf16[256,48,16,32]{2,3,1,0:T(8,128)(2,1)} copy(%x.5)
}
"""


def test_fusions_and_async_slices_read_only_the_slices():
    report = analyze(SLICED)
    assert {op.name: op.bytes for op in report.top_ops} == {
        "row": 2 * 1024 * 4,  # the [1, 1024] row read and written, not the [64, 1024] table
        "overlap": 64 * 1024 * 4 + 48 * 1024 * 4,  # slices adding up to more than the table: the table, once
        "slice-start": 8 * 1024 * 4}  # read from HBM; written to VMEM
    assert report.bytes_by_memory_space[6] == 4  # the index, in scalar memory
    assert report.vmem_bytes == 8 * 1024 * 4
    assert report.top_ops[0].op == "fusion:kLoop"


def test_an_in_place_update_counts_the_update_and_vmem_is_not_hbm():
    report = analyze(CACHE)
    (loop,) = report.loops
    assert (loop.name, loop.trip_count, loop.executions, loop.parent) == ("loop", 16, 1, None)
    assert loop.iteration_bytes == CACHE_ROW  # the row written into the cache; the row read is from VMEM
    assert report.per_step_bytes == 17 * CACHE_ROW  # the row's copy from HBM into VMEM, then 16 updates
    assert report.vmem_bytes == 17 * CACHE_ROW  # copy-start's destination, then the fusion's 16 reads of the row


def test_trip_counts_from_the_compiler_or_counted_once():
    known = analyze(CACHE_NO_COUNTER.replace("body=%body",
                                             'body=%body, backend_config={"known_trip_count":{"n":"5"}}'))
    assert known.loops[0].trip_count == 5
    assert known.per_step_bytes == CACHE_ROW + 5 * CACHE_ROW
    unknown = analyze(CACHE_NO_COUNTER)
    assert unknown.loops[0].trip_count is None  # listed as a loop of unknown trip count, and counted once:
    assert unknown.per_step_bytes == CACHE_ROW + CACHE_ROW


def test_collectives_async_pairs_and_tuple_results():
    report = analyze(COLLECTIVES)
    shard, block = 1024 * 256 * 4, 256 * 256 * 4
    assert report.collectives == {"all-gather": Collective(1, 4 * shard),
                                  "reduce-scatter": Collective(2, 2 * block)}  # the kCustom fusion and async one
    expected = {"all-gather-start": shard + 4 * shard,  # not its result's first element: that is the operand
                "fusion.1": shard + block, "reduce-scatter.1": shard + block,
                "fusion.2": 2 * (512 + 8) * 256 * 4}  # only the two slices read; both results written
    assert {op.name: op.bytes for op in report.top_ops} == expected
    assert report.per_step_bytes == sum(expected.values())


def test_an_async_collective_fusion_counts_once_where_it_starts():
    report = analyze(ASYNC)
    shard, gathered, activations = 128 * 512 * 2, 512 * 512 * 2, 64 * 512 * 4
    assert report.collectives == {"all-gather": Collective(1, gathered)}
    assert report.tpu_custom_calls == {"AsyncCollectiveDone": 1, "AsyncCollectiveStart": 1}
    # The start reads the shard and writes the gathered result; the carried buffers cost nothing until then.
    assert {op.name: op.bytes for op in report.top_ops} == {"async-collective-start": shard + gathered,
                                                            "fusion.6": 2 * activations}


def test_host_transfers_custom_calls_and_conditionals():
    report = analyze(HOST)
    assert report.loops[0].trip_count == 3
    assert report.custom_calls == {"tpu_custom_call": 3, "xla_ffi_python_cpu_callback": 3}
    assert report.tpu_custom_calls == {"AllocateBuffer": 1}
    kinds = [(t.name, t.kind, t.bytes, t.count, t.loop) for t in report.host_transfers]
    assert kinds == [("cb", "callback:xla_ffi_python_cpu_callback", 2 * 1024, 3, "loop.1"),
                     ("to_host", "to host memory", 1024, 1, None)]
    names = {op.name for op in report.top_ops}
    assert {"square", "total"} <= names and "neg" not in names  # the larger branch is the one counted


def test_padded_bytes_round_the_minor_dims_up_to_the_tiles():
    report = analyze(TILED)
    assert report.per_step_bytes == 2 * 256 * 48 * 16 * 32 * 2
    # read: [.., 16, 32] -> [.., 16, 128]; written in layout {2,3,1,0}: [.., 32, 16] -> [.., 32, 128]
    assert report.per_step_padded_bytes == 256 * 48 * 16 * 128 * 2 + 256 * 48 * 32 * 128 * 2
    assert json.loads(json.dumps(report.to_dict()))["per_step_bytes"] == report.per_step_bytes


# ---- TPU programs compiled here, ahead of time ----

BIG_ROW = 4096 * 4096 * 2  # bytes of a [4096, 4096] bf16 row of the caches below, which are too big for VMEM


@pytest.fixture(scope="module")
def devices():
    """The devices of a v5e:2x2 slice, from libtpu, on this machine."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: other processes may hold libtpu
    try:
        return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    except Exception as err:  # libtpu's own error types
        pytest.skip(f"libtpu cannot describe a v5e:2x2 slice here: {err}")


def spec(devices, shape, dtype=jnp.bfloat16, partition=None):
    """A ShapeDtypeStruct on a 1-D mesh "data" of `devices`, sharded by `partition` (replicated when None)."""
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec(partition))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def compiled(f, *args) -> str:
    """The optimized HLO text of `f` compiled for the devices of `args`."""
    return jax.jit(f).lower(*args).compile().as_text()


def test_a_matmul_moves_its_operands_and_result(devices):
    matrix = spec(devices[:1], (1024, 1024))
    report = analyze(compiled(lambda a, b: a @ b, matrix, matrix))
    assert report.per_step_bytes == pytest.approx(3 * 1024 * 1024 * 2, rel=0.01)
    assert report.loops == () and report.collectives == {} and report.host_transfers == ()


def add_rows(trips):
    """Sums the first `trips` rows of a cache, one per iteration of a fori_loop."""
    def run(cache):
        add_row = lambda i, total: total + lax.dynamic_index_in_dim(cache, i, keepdims=False)
        return lax.fori_loop(0, trips, add_row, jnp.zeros(cache.shape[1:], cache.dtype))
    return run


def test_a_loop_of_known_trip_count_counts_its_body_that_often(devices):
    cache = spec(devices[:1], (8, 4096, 4096))
    eight, four = (analyze(compiled(add_rows(trips), cache)) for trips in (8, 4))
    (loop,) = eight.loops
    assert loop.trip_count == 8 and four.loops[0].trip_count == 4
    assert loop.iteration_bytes == pytest.approx(BIG_ROW, rel=0.01)  # the row read, not the whole cache
    assert eight.per_step_bytes - four.per_step_bytes == 4 * loop.iteration_bytes
    assert eight.per_step_bytes == pytest.approx(8 * BIG_ROW + BIG_ROW, rel=0.01)  # and the sum written once


def test_a_data_dependent_while_is_counted_once_and_listed(devices):
    def run(cache):
        def body(state):
            i, total = state
            return i + 1, total + lax.dynamic_index_in_dim(cache, i % 8, keepdims=False)
        start = (0, jnp.zeros(cache.shape[1:], cache.dtype))
        return lax.while_loop(lambda state: state[1][0, 0] < 100, body, start)

    report = analyze(compiled(run, spec(devices[:1], (8, 4096, 4096))))
    (loop,) = report.loops
    assert loop.trip_count is None
    assert loop.iteration_bytes >= BIG_ROW
    assert report.per_step_bytes < 3 * loop.iteration_bytes  # once, plus what runs outside the loop


def test_a_psum_over_four_chips_is_one_all_reduce(devices):
    mesh = Mesh(np.array(devices), ("data",))
    psum = jax.shard_map(lambda x: lax.psum(x, "data"), mesh=mesh, in_specs=PartitionSpec("data"),
                         out_specs=PartitionSpec())
    report = analyze(compiled(psum, spec(devices, (4 * 256, 512), jnp.float32, "data")))
    assert report.collectives == {"all-reduce": Collective(1, 256 * 512 * 4)}


def test_a_host_callback_in_a_loop_is_flagged(devices):
    def run(x):
        def body(i, x):
            return jax.pure_callback(lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1
        return lax.fori_loop(0, 4, body, x)

    report = analyze(compiled(run, spec(devices[:1], (128, 128), jnp.float32)))
    (loop,) = report.loops
    assert report.host_transfers
    assert {(transfer.loop, transfer.count) for transfer in report.host_transfers} == {(loop.name, 4)}


def test_a_cache_update_in_a_loop_is_in_place(devices):
    def run(cache, row):
        write = lambda i, cache: lax.dynamic_update_slice(cache, row[None] * i.astype(row.dtype), (i, 0, 0))
        return lax.fori_loop(0, 8, write, cache)

    report = analyze(compiled(run, spec(devices[:1], (8, 4096, 4096)), spec(devices[:1], (4096, 4096))))
    (loop,) = report.loops
    assert loop.trip_count == 8
    assert loop.iteration_bytes == pytest.approx(BIG_ROW, rel=0.01)  # the row written, not the 8-row cache


def test_a_pallas_kernel_is_a_users_custom_call(devices):
    from jax.experimental import pallas as pl

    def double(x_ref, out_ref):
        out_ref[...] = x_ref[...] * 2

    kernel = lambda x: pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
    report = analyze(compiled(kernel, spec(devices[:1], (256, 256), jnp.float32)))
    assert report.custom_calls == {"tpu_custom_call": 1}
    assert report.per_step_bytes == 2 * 256 * 256 * 4
