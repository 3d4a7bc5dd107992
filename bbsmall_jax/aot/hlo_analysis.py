"""HBM traffic, collectives, custom calls and host transfers of an optimized HLO module, read from its text.

XLA's `cost_analysis()["bytes accessed"]` adds every operand and result wherever it lives, on-chip VMEM too,
and counts a while body once whatever its trip count: on v5e it gives 235 MB for a [4096, 4096] bf16 matmul
whose operands and result are 101 MB, and 235 MB for a loop whose 16 dynamic slices read 537 MB of a cache. A
naive count of each instruction's operands and result would also take a fused parameter that is only sliced
whole, an in-place cache update for a rewrite of the cache, and an async collective's buffers once more in each
fusion that carries it. This estimate counts HBM only (no `S(n)` in the layout), with those cases handled,
and multiplies loop bodies by the compiler's `known_trip_count` or, where TPU text leaves it out, by the
count of a constant loop counter. Against the project's acceptance tool (hlo_hbm_bytes.py) the logical totals
agree to the byte or within scalars on most programs; they differ by design where this counts while conditions
(once per iteration), only the largest branch of a conditional, a host send's buffer once, an unfused
dynamic-update-slice in place, an unfused slice as its slice, and an async collective's carried buffers once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
from typing import Iterator, Optional, Union

from bbsmall_jax.errors import UsageError

HBM, VMEM, HOST = 0, 1, 5  # TPU memory spaces, printed `S(n)` in a layout (none printed: 0)
FREE_OPCODES = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
                          "add-dependency", "opt-barrier", "domain"})
CONTROL_OPCODES = frozenset({"while", "conditional", "call", "async-start"})  # their computations are walked
SLICE_OPCODES = frozenset({"dynamic-slice", "slice", "gather", "slice-start"})  # slice-start: async, into VMEM
COLLECTIVES = {"all-reduce": "all-reduce", "all-reduce-start": "all-reduce", "all-gather": "all-gather",
               "all-gather-start": "all-gather", "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
               "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
               "collective-permute-start": "collective-permute", "collective-broadcast": "collective-broadcast"}
# Collective fusions named by what they do; the name wins over the collectives inside (an all-reduce-scatter
# fusion holds an all-reduce and a dynamic-slice). Most specific first.
FUSION_NAMES = ("reduce-scatter", "all-gather", "all-reduce", "all-to-all", "collective-permute")
# Custom calls in TPU executables compiled from plain jnp code (buffers, jnp.linalg, gathers, lax.top_k,
# concatenations, async collectives): XLA's TPU compiler emits them itself. Anything else is a user's kernel
# (Pallas: tpu_custom_call) or a host callback.
TPU_INTERNAL_TARGETS = frozenset({
    "AllocateBuffer", "AssumeGatherIndicesInBound", "Cholesky", "CompactWyHelper", "EighTpu",
    "GatherScatterIndicesBitpacked", "InvertDiagBlocksLowerTriangular", "InvertDiagBlocksUpperTriangular",
    "LuDecompositionBlock", "QrDecompositionBlock", "ConcatBitcast", "TopK", "AsyncCollectiveStart",
    "AsyncCollectiveDone", "X64Combine", "X64SplitLow", "X64SplitHigh"})  # X64*: 64-bit values as two 32-bit halves (rbg keys)
ASYNC_START, ASYNC_DONE = "AsyncCollectiveStart", "AsyncCollectiveDone"  # roots of TPU's async collective fusions
FREE_TARGETS = frozenset({"AllocateBuffer"})  # reserves memory, moves nothing
# What these ops write of their tuple results; the other elements alias operands or are sync flags.
WRITTEN_ELEMENT = {"copy-start": 0, "recv": 0, "infeed": 0, "all-gather-start": 1, "collective-permute-start": 1,
                   "slice-start": 1}
NOTHING_WRITTEN = frozenset({"send", "outfeed"})
ELEMENT_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32, "u32": 32,
                "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128, "s4": 4, "u4": 4, "s2": 2,
                "u2": 2, "s1": 1, "u1": 1, "token": 0, "opaque": 0}


@dataclasses.dataclass(frozen=True)
class OpBytes:
    """One instruction's HBM traffic over a step."""

    name: str
    op: str  # the opcode; `fusion:kLoop` for fusions, `custom-call:target` for custom calls
    bytes: int  # logical HBM bytes, all executions
    executions: int
    shape: str  # the result type as printed


@dataclasses.dataclass(frozen=True)
class LoopBytes:
    """One while loop: how often it runs and the HBM traffic of one iteration."""

    name: str
    trip_count: Optional[int]  # None: decided at run time, counted once in `per_step_bytes`
    executions: int  # times the loop starts per step (known trip counts of enclosing loops multiplied)
    parent: Optional[str]  # the enclosing loop
    iteration_bytes: int  # body and condition once, loops inside multiplied by their known trip counts
    iteration_padded_bytes: int


@dataclasses.dataclass(frozen=True)
class Collective:
    """The collectives of one kind over a step."""

    count: int  # times executed
    bytes: int  # their results' bytes, summed over executions


@dataclasses.dataclass(frozen=True)
class HostTransfer:
    """An instruction that moves data between the chip and its host."""

    name: str
    kind: str  # send, recv, infeed, outfeed, callback:<target>, to host memory, from host memory
    bytes: int  # per execution
    count: int  # times executed per step
    loop: Optional[str]  # the innermost while loop around it


@dataclasses.dataclass(frozen=True)
class HloReport:
    """What a compile report needs of one optimized HLO module (a TPU executable's `as_text()`)."""

    module: str
    per_step_bytes: int  # HBM, logical shapes; known trip counts multiplied, unknown ones counted once
    per_step_padded_bytes: int  # the same with the minor dims rounded up to the layout's tiles
    bytes_by_memory_space: dict  # memory space -> logical bytes (0: HBM, 1: VMEM, 5: host), same counting
    loops: tuple  # LoopBytes, in program order
    top_ops: tuple  # OpBytes, most bytes first
    collectives: dict  # kind -> Collective
    custom_calls: dict  # target -> times executed: users' kernels and host callbacks
    tpu_custom_calls: dict  # target -> times executed: TPU_INTERNAL_TARGETS
    host_transfers: tuple  # HostTransfer, in program order

    @property
    def vmem_bytes(self) -> int:
        """Bytes read and written in on-chip VMEM (S(1)), not counted as HBM."""
        return self.bytes_by_memory_space.get(VMEM, 0)

    def to_dict(self) -> dict:
        """The report as JSON-able dicts and lists."""
        return dataclasses.asdict(self)


# ---- the text: shapes, instructions, computations ----

@dataclasses.dataclass(frozen=True)
class _Array:
    dtype: str
    dims: tuple
    minor_to_major: tuple  # () when the layout is not printed
    tile: tuple  # the layout's first tile, () when none
    space: int
    bits: int  # per element

    @property
    def logical_bytes(self) -> int:
        return math.ceil(math.prod(self.dims) * self.bits / 8)

    @property
    def padded_bytes(self) -> int:
        if not self.tile or not self.dims:  # a scalar has no minor dim to round up
            return self.logical_bytes
        order = reversed(self.minor_to_major) if self.minor_to_major else range(len(self.dims))
        physical = [1] * max(0, len(self.tile) - len(self.dims)) + [self.dims[d] for d in order]
        split = len(physical) - len(self.tile)
        tiled = [-(-n // t) * t for n, t in zip(physical[split:], self.tile)]
        return math.ceil(math.prod(physical[:split] + tiled) * self.bits / 8)


Shape = Union[_Array, tuple]  # a tuple shape is a tuple of shapes
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](?:\{([^}]*)\})?")
_SEPARATORS = re.compile(r"[,\s]*")
_BRACKETS = re.compile(r"[(\[{]")
_VALUE_END = re.compile(r"[\s,]|$")


def _element_bits(dtype: str, layout: str) -> int:
    explicit = re.search(r"E\((\d+)\)", layout)
    if explicit:
        return int(explicit.group(1))
    if dtype in ELEMENT_BITS:
        return ELEMENT_BITS[dtype]
    if dtype.startswith(("f8", "f6", "f4")):
        return int(dtype[1])
    raise UsageError(f"unknown HLO element type {dtype!r}")


@functools.lru_cache(maxsize=1 << 16)  # a module repeats few distinct array types many times
def _array(text: str) -> _Array:
    dtype, dims, layout = _ARRAY.fullmatch(text).group(1, 2, 3)
    layout = layout or ""
    order, _, tiling = layout.partition(":")
    tile = re.search(r"T\(([\d,]+)\)", tiling)
    space = re.search(r"S\((\d+)\)", tiling)
    return _Array(dtype, tuple(int(d.lstrip("<=")) for d in dims.split(",") if d.strip()),
                  tuple(int(d) for d in order.split(",") if d.strip()),
                  tuple(int(t) for t in tile.group(1).split(",")) if tile else (),
                  int(space.group(1)) if space else HBM, _element_bits(dtype, tiling))


def _parse_shape(text: str, pos: int = 0) -> tuple[Shape, int]:
    """The shape printed at `text[pos:]` and the position after it."""
    if text[pos] != "(":
        match = _ARRAY.match(text, pos)
        if not match:
            raise UsageError(f"no HLO shape at {text[pos:pos + 60]!r}")
        return _array(match.group(0)), match.end()
    elements, pos = [], pos + 1
    while text[pos] != ")":
        element, pos = _parse_shape(text, pos)
        elements.append(element)
        pos = _SEPARATORS.match(text, pos).end()
    return tuple(elements), pos + 1


def _leaves(shape: Shape) -> list[_Array]:
    return [shape] if isinstance(shape, _Array) else [leaf for s in shape for leaf in _leaves(s)]


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape: Shape
    type_text: str
    opcode: str
    operands: tuple  # operand names (or a constant's literal)
    attrs: str  # everything after the operands

    def attr(self, key: str) -> Optional[str]:
        match = re.search(rf"(?:^|[\s,]){key}=", self.attrs)
        if not match:
            return None
        text, start = self.attrs, match.end()
        if text.startswith("{", start):
            return text[start:_closing(text, start) + 1]
        if text.startswith('"', start):
            return text[start:text.index('"', start + 1) + 1]
        return text[start:_VALUE_END.search(text, start).start()]

    def target(self) -> Optional[str]:
        """A custom call's target."""
        quoted = self.attr("custom_call_target")
        return quoted.strip('"') if quoted else None

    def callees(self, key: str) -> list[str]:
        value = self.attr(key) or ""
        return [name.strip().lstrip("%") for name in value.strip("{}").split(",") if name.strip()]


def _closing(text: str, pos: int) -> int:
    """The index of the bracket closing the one at `pos`."""
    depth = 0
    for index in range(pos, len(text)):
        depth += (text[index] in "([{") - (text[index] in ")]}")
        if depth == 0:
            return index
    raise UsageError(f"unbalanced HLO text: {text[pos:pos + 60]!r}")


def _split_top(text: str) -> list[str]:
    """`text` split at the commas outside brackets."""
    if not _BRACKETS.search(text):
        return [part.strip() for part in text.split(",") if part.strip()]
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return [part.strip() for part in parts + [text[start:]] if part.strip()]


_INSTRUCTION = re.compile(r"\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_COMMENT = re.compile(r"/\*.*?\*/")


def _parse_instruction(line: str) -> tuple[_Instruction, bool]:
    """An instruction line as (instruction, is it the root)."""
    line = _COMMENT.sub("", line)  # long operand lists and tuples number their elements: /*index=5*/
    head = _INSTRUCTION.match(line)
    shape, pos = _parse_shape(line, head.end())
    opcode = _OPCODE.match(line, pos)
    close = line.find(")", opcode.end())
    if _BRACKETS.search(line, opcode.end(), close):  # a literal or typed operands: brackets inside
        close = _closing(line, opcode.end() - 1)
    operands = tuple(part.split()[-1].lstrip("%") for part in _split_top(line[opcode.end():close]))
    instruction = _Instruction(head.group(2), shape, line[head.end():pos], opcode.group(1), operands,
                               line[close + 1:].lstrip(", "))
    return instruction, bool(head.group(1))


@dataclasses.dataclass
class _Computation:
    name: str
    instructions: list
    root: Optional[_Instruction] = None
    by_name: dict = dataclasses.field(default_factory=dict)
    users: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def add(self, instruction: _Instruction, is_root: bool):
        self.instructions.append(instruction)
        self.by_name[instruction.name] = instruction
        for index, operand in enumerate(instruction.operands):
            self.users[operand].append((instruction, index))
        if is_root:
            self.root = instruction

    def shape(self, name: str) -> Optional[Shape]:
        return self.by_name[name].shape if name in self.by_name else None

    def through(self, name: str, opcodes=("copy", "bitcast")) -> Optional[_Instruction]:
        """The instruction `name` refers to, looking through copies and bitcasts."""
        instruction = self.by_name.get(name)
        while instruction is not None and instruction.opcode in opcodes:
            instruction = self.by_name.get(instruction.operands[0])
        return instruction

    def outputs(self) -> list[_Instruction]:
        """The values the computation returns (a tuple root's elements), through bitcasts."""
        names = self.root.operands if self.root.opcode == "tuple" else (self.root.name,)
        return [self.through(name, ("bitcast",)) for name in names]


@dataclasses.dataclass
class _Module:
    name: str
    entry: str
    computations: dict
    traffic_cache: dict = dataclasses.field(default_factory=dict)

    def traffic(self, computation: _Computation, instruction: _Instruction) -> list:
        """The arrays one execution of `instruction` reads and writes (called computations not included)."""
        key = (computation.name, instruction.name)
        if key not in self.traffic_cache:
            self.traffic_cache[key] = _traffic(self, computation, instruction)
        return self.traffic_cache[key]


_HEADER = re.compile(r"(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")


def _parse_module(text: str) -> _Module:
    """The computations of an HLO module's text (`compiled.as_text()`)."""
    name = re.search(r"^HloModule\s+([^\s,]+)", text, re.MULTILINE)
    module = _Module(name.group(1) if name else "", "", {})
    current = None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = module.computations.setdefault(header.group(2), _Computation(header.group(2), []))
                module.entry = header.group(2) if header.group(1) else module.entry
        elif line.strip() == "}":
            current = None
        elif line.strip():
            current.add(*_parse_instruction(line))
    if module.entry not in module.computations:
        raise UsageError("no ENTRY computation in the HLO text")
    return module


# ---- bytes one execution of an instruction moves ----

def _with_space(arrays, space: int) -> list[_Array]:
    return [dataclasses.replace(array, space=space) for array in arrays]


def _written(instruction: _Instruction) -> list[_Array]:
    if instruction.opcode in NOTHING_WRITTEN:
        return []
    index = WRITTEN_ELEMENT.get(instruction.opcode)
    if index is not None and isinstance(instruction.shape, tuple):
        return _leaves(instruction.shape[index])
    return _leaves(instruction.shape)


def _sliced(reads: list[_Array], whole: Shape) -> list[_Array]:
    """Slices read of an array, in its memory space; all of it when they add up to more (overlapping slices)."""
    if not isinstance(whole, _Array) or sum(a.logical_bytes for a in reads) > whole.logical_bytes:
        return _leaves(whole)
    return _with_space(reads, whole.space)


def _root_target(fused: _Computation) -> Optional[str]:
    return fused.root.target() if fused.root.opcode == "custom-call" else None


def _carried(fusion: _Instruction, fused: _Computation) -> set:
    """Names of the fused values a fusion returns in its operands' buffers untouched: parameters passed through,
    and the collectives an async collective fusion carries along (they move their data once, from the start)."""
    aliased = {int(i or 0) for i in re.findall(r"\{(\d*)\}:", fusion.attr("output_to_operand_aliasing") or "")}
    return {output.name for index, output in enumerate(fused.outputs())
            if index in aliased and (output.opcode == "parameter" or output.opcode in COLLECTIVES)}


def _parameter_reads(fused: _Computation, name: str, carried: set) -> Optional[list[_Array]]:
    """What a fusion reads of its parameter `name`: only its slices, nothing for an in-place update of it or a
    value carried through, or None for all of it."""
    reads, outputs = [], {output.name for output in fused.outputs()}
    for user, index in fused.users[name]:
        if user.name in carried or (user.name == fused.root.name and name in carried):
            continue
        if user.opcode == "bitcast":
            inner = _parameter_reads(fused, user.name, carried)
            if inner is None:
                return None
            reads += inner
        elif user.opcode in SLICE_OPCODES and index == 0:
            reads += _leaves(user.shape)
        elif not (user.opcode == "dynamic-update-slice" and index == 0 and user.name in outputs):
            return None
    return reads


def _fusion_writes(fused: _Computation, fusion: _Instruction, carried: set) -> list[_Array]:
    if _root_target(fused) == ASYNC_START:
        return _leaves(fusion.shape[1])  # (operand, result, sync flags...): the collective's result
    arrays = []
    results = fusion.shape if fused.root.opcode == "tuple" else (fusion.shape,)
    for output, result in zip(fused.outputs(), results):  # the caller's layouts: inside, bitcasts may drop S(n)
        in_place = (output.opcode == "dynamic-update-slice"
                    and fused.through(output.operands[0], ("bitcast",)).opcode == "parameter")
        if in_place:
            arrays += _with_space(_leaves(fused.shape(output.operands[1])), result.space)
        elif output.name not in carried:
            arrays += _leaves(result)
    return arrays


def _fusion_traffic(module: _Module, computation: _Computation, fusion: _Instruction) -> list[_Array]:
    fused = module.computations[fusion.callees("calls")[0]]
    if _root_target(fused) == ASYNC_DONE:
        return []  # the waiting half of an async collective
    carried = _carried(fusion, fused)
    parameters = {int(i.operands[0]): i.name for i in fused.instructions if i.opcode == "parameter"}
    arrays = []
    for index, operand in enumerate(fusion.operands):
        shape = computation.shape(operand)
        reads = _parameter_reads(fused, parameters[index], carried)
        arrays += _leaves(shape) if reads is None else _sliced(reads, shape)
    return arrays + _fusion_writes(fused, fusion, carried)


def _operand_reads(instruction: _Instruction, index: int, shape: Shape) -> list[_Array]:
    if instruction.opcode in SLICE_OPCODES and index == 0:
        return _sliced(_written(instruction), shape)
    if instruction.opcode == "dynamic-update-slice" and index == 0:
        return []  # updated in place: copy insertion has made the buffer the update's own
    return _leaves(shape)


def _traffic(module: _Module, computation: _Computation, instruction: _Instruction) -> list[_Array]:
    opcode = instruction.opcode
    if (opcode in FREE_OPCODES or opcode in CONTROL_OPCODES or opcode.endswith("-done")
            or instruction.target() in FREE_TARGETS):
        return []
    if opcode == "fusion":
        return _fusion_traffic(module, computation, instruction)
    arrays = []
    for index, operand in enumerate(instruction.operands):
        shape = computation.shape(operand)
        arrays += _operand_reads(instruction, index, shape) if shape is not None else []
    if opcode == "dynamic-update-slice":
        update = _leaves(computation.shape(instruction.operands[1]))
        return arrays + _with_space(update, instruction.shape.space)
    return arrays + _written(instruction)


# ---- which instructions run, and how often ----

@dataclasses.dataclass(frozen=True)
class _Visit:
    computation: _Computation
    instruction: _Instruction
    times: int  # executions per step
    loops: tuple  # names of the while loops around it, outermost first
    counted: bool  # False in a conditional's smaller branches: listed, not counted in bytes


def _constant(computation: _Computation, name: str) -> Optional[int]:
    instruction = computation.through(name)
    if instruction is None or instruction.opcode != "constant":
        return None
    try:
        return int(instruction.operands[0])
    except (ValueError, IndexError):
        return None


def _tuple_index(computation: _Computation, name: str) -> Optional[int]:
    """k when `name` is (a copy of) element k of the computation's parameter."""
    instruction = computation.through(name)
    if instruction is None or instruction.opcode != "get-tuple-element":
        return None
    source = computation.by_name.get(instruction.operands[0])
    return int(instruction.attr("index")) if source is not None and source.opcode == "parameter" else None


def _loop_bound(condition: _Computation) -> Optional[tuple[int, int, bool]]:
    """(counter's tuple index, bound, bound included) of a condition `i < n` or `i <= n` on a constant n."""
    compare = condition.through(condition.root.name)
    if compare is None or compare.opcode != "compare":
        return None
    direction, (left, right) = compare.attr("direction"), compare.operands[:2]
    if direction in ("GT", "GE"):
        direction, left, right = {"GT": "LT", "GE": "LE"}[direction], right, left
    index, bound = _tuple_index(condition, left), _constant(condition, right)
    if direction not in ("LT", "LE") or index is None or bound is None:
        return None
    return index, bound, direction == "LE"


def _loop_stride(body: _Computation, index: int) -> Optional[int]:
    """s when the body returns element `index` of its parameter plus a constant s."""
    if body.root.opcode != "tuple":
        return None
    step = body.through(body.root.operands[index])
    if step is None or step.opcode != "add":
        return None
    pairs = [(a, b) for a, b in (step.operands, step.operands[::-1]) if _tuple_index(body, a) == index]
    return _constant(body, pairs[0][1]) if pairs else None


def _counter_trip_count(module: _Module, computation: _Computation, loop: _Instruction) -> Optional[int]:
    """The trip count of `for (i = a; i < n; i += s)` over constants (what XLA's TPU text leaves implicit)."""
    found = _loop_bound(module.computations[loop.callees("condition")[0]])
    init = computation.by_name.get(loop.operands[0])
    if found is None or init is None or init.opcode != "tuple":
        return None
    index, bound, inclusive = found
    start = _constant(computation, init.operands[index])
    stride = _loop_stride(module.computations[loop.callees("body")[0]], index)
    if start is None or not stride or stride < 0:
        return None
    return max(0, -(-(bound + inclusive - start) // stride))


def _trip_count(module: _Module, computation: _Computation, loop: _Instruction) -> Optional[int]:
    """The while loop's trip count: the compiler's `known_trip_count`, else a constant counter's, else None."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
    return int(known.group(1)) if known else _counter_trip_count(module, computation, loop)


def _hbm(module: _Module, visits, padded: bool = False) -> int:
    """The HBM bytes the counted visits move."""
    return sum((a.padded_bytes if padded else a.logical_bytes) * v.times for v in visits if v.counted
               for a in module.traffic(v.computation, v.instruction) if a.space == HBM)


def _branches(instruction: _Instruction) -> list[str]:
    return (instruction.callees("branch_computations")
            or instruction.callees("true_computation") + instruction.callees("false_computation"))


def _visits(module: _Module, name: str, times: int = 1, loops: tuple = (), counted: bool = True
            ) -> Iterator[_Visit]:
    """Every instruction executed when computation `name` runs `times` times, called computations included."""
    computation = module.computations[name]
    for instruction in computation.instructions:
        yield _Visit(computation, instruction, times, loops, counted)
        if instruction.opcode == "while":
            trips = _trip_count(module, computation, instruction) or 1
            for callee in instruction.callees("condition") + instruction.callees("body"):
                yield from _visits(module, callee, times * trips, loops + (instruction.name,), counted)
        elif instruction.opcode == "conditional":
            branches = _branches(instruction)
            largest = max(branches, key=lambda branch: _hbm(module, _visits(module, branch)))
            for branch in branches:
                yield from _visits(module, branch, times, loops, counted and branch == largest)
        elif instruction.opcode in ("call", "async-start"):
            for callee in instruction.callees("to_apply") + instruction.callees("calls"):
                yield from _visits(module, callee, times, loops, counted)


# ---- the report ----

def _label(instruction: _Instruction) -> str:
    if instruction.opcode == "fusion":
        return f"fusion:{instruction.attr('kind')}"
    if instruction.opcode == "custom-call":
        return f"custom-call:{instruction.target()}"
    return instruction.opcode


def _top_ops(module: _Module, visits, top: int) -> tuple:
    totals = collections.defaultdict(lambda: [0, 0])
    for visit in visits:
        moved = _hbm(module, [visit])
        if moved:
            totals[visit.instruction][0] += moved
            totals[visit.instruction][1] += visit.times
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return tuple(OpBytes(i.name, _label(i), moved, n, i.type_text) for i, (moved, n) in ranked)


def _loop(module: _Module, visit: _Visit) -> LoopBytes:
    loop = visit.instruction
    inner = [v for callee in loop.callees("condition") + loop.callees("body") for v in _visits(module, callee)]
    return LoopBytes(loop.name, _trip_count(module, visit.computation, loop), visit.times,
                     visit.loops[-1] if visit.loops else None, _hbm(module, inner), _hbm(module, inner, True))


def _called(module: _Module, name: str) -> Iterator[_Instruction]:
    """The instructions of computation `name` and of the fusions inside it."""
    for instruction in module.computations[name].instructions:
        yield instruction
        if instruction.opcode == "fusion":
            yield from _called(module, instruction.callees("calls")[0])


def _result_bytes(arrays) -> int:
    return sum(array.logical_bytes for array in arrays)


def _collectives_of(module: _Module, instruction: _Instruction) -> list[tuple[str, int]]:
    """(kind, result bytes) of the collectives one execution of `instruction` starts."""
    if instruction.opcode in COLLECTIVES:
        return [(COLLECTIVES[instruction.opcode], _result_bytes(_written(instruction)))]
    if instruction.opcode != "fusion":
        return []
    fused = module.computations[instruction.callees("calls")[0]]
    if _root_target(fused) == ASYNC_DONE:
        return []
    carried = _carried(instruction, fused)  # started by an earlier fusion of the same async collective
    inner = [item for i in _called(module, fused.name) if i.opcode in COLLECTIVES and i.name not in carried
             for item in _collectives_of(module, i)]
    named = [kind for kind in FUSION_NAMES if kind in fused.name]
    return [(named[0], _result_bytes(_leaves(instruction.shape)))] if inner and named else inner


def _collectives(module: _Module, visits) -> dict:
    totals = collections.defaultdict(lambda: [0, 0])
    for visit in visits:
        for kind, moved in _collectives_of(module, visit.instruction):
            totals[kind][0] += visit.times
            totals[kind][1] += moved * visit.times
    return {kind: Collective(count, moved) for kind, (count, moved) in sorted(totals.items())}


def _targets(module: _Module, instruction: _Instruction) -> list[str]:
    inside = _called(module, instruction.callees("calls")[0]) if instruction.opcode == "fusion" else [instruction]
    return [i.target() for i in inside if i.opcode == "custom-call"]


def _custom_calls(module: _Module, visits) -> tuple[dict, dict]:
    users, internal = collections.Counter(), collections.Counter()
    for visit in visits:
        for target in _targets(module, visit.instruction):
            (internal if target in TPU_INTERNAL_TARGETS else users)[target] += visit.times
    return dict(sorted(users.items())), dict(sorted(internal.items()))


def _host_kind(module: _Module, visit: _Visit) -> Optional[tuple[str, int]]:
    """(kind, bytes per execution) when the visited instruction moves data between the chip and the host."""
    instruction = visit.instruction
    arrays = module.traffic(visit.computation, instruction)
    host_transfer = instruction.attr("is_host_transfer") == "true"
    if instruction.opcode in ("infeed", "outfeed") or (instruction.opcode in ("send", "recv") and host_transfer):
        return instruction.opcode, _result_bytes(arrays)
    callbacks = [t for t in _targets(module, instruction) if "callback" in t.lower()]
    if callbacks:
        return f"callback:{callbacks[0]}", _result_bytes(arrays)
    host = [a for a in arrays if a.space == HOST]
    if not host:
        return None
    direction = "to" if any(a.space == HOST for a in _written(instruction)) else "from"
    return f"{direction} host memory", _result_bytes(host)


def _host_transfers(module: _Module, visits) -> tuple:
    transfers = []
    for visit in visits:
        found = _host_kind(module, visit)
        if found:
            loop = visit.loops[-1] if visit.loops else None
            transfers.append(HostTransfer(visit.instruction.name, found[0], found[1], visit.times, loop))
    return tuple(transfers)


def analyze(text: str, top: int = 10) -> HloReport:
    """The compile report's figures of an optimized HLO module's text (`compiled.as_text()`)."""
    module = _parse_module(text)
    visits = list(_visits(module, module.entry))
    by_space = collections.Counter()
    for visit in visits:
        for array in module.traffic(visit.computation, visit.instruction) if visit.counted else ():
            by_space[array.space] += array.logical_bytes * visit.times
    users, internal = _custom_calls(module, visits)
    loops = tuple(_loop(module, visit) for visit in visits if visit.instruction.opcode == "while")
    return HloReport(module.name, by_space[HBM], _hbm(module, visits, padded=True),
                     dict(sorted(by_space.items())), loops, _top_ops(module, visits, top),
                     _collectives(module, visits), users, internal, _host_transfers(module, visits))
