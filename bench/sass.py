"""Reading SASS (the GPU's machine code) as `cuobjdump -sass` prints it: functions, loops, counts.

Pure text processing, no GPU and no CUDA toolkit: `bench.roofline` feeds it the
disassembly of the compiled kernels, and `python_tests/test_roofline.py` feeds it
hand-made snippets.

A loop is a backward branch: a `BRA` whose target address is at or before its own
address (the header), the branch itself being the latch.  Its body is every
instruction between header and latch, inclusive; code the compiler moved out of
line (cold paths placed after the function's main body) is not in it.  Loops with
the same header (several back edges) are one loop ending at the last latch.  The
`BRA` to itself that ends every function (a trap after the last `EXIT`) is not a
loop.  Two counts per loop:

* `static`: every instruction of the body.  Exact per iteration for straight-line
  bodies (Triton's, whose per-element choices are predicated), an upper bound where
  the body holds branches of which one side runs;
* `shortest`: the fewest instructions along a path from header to latch through
  the body's forward branches, inner loops run once.  A lower bound where the
  body branches at run time (e.g. on which loss terms are on).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional

_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@(!?U?P(?:T|\d))\s+")
_HEX = re.compile(r"0x([0-9a-fA-F]+)")

# Bytes moved per thread by a memory instruction, from its width suffix.
_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str                 # with modifiers, e.g. "LDG.E.128"
    operands: str
    predicate: Optional[str]    # "P0", "!P1", ... or None

    @property
    def op(self) -> str:
        """The opcode without modifiers: "LDG"."""
        return self.opcode.split(".", 1)[0]

    @property
    def conditional(self) -> bool:
        return self.predicate is not None and self.predicate not in ("PT", "UPT")

    @property
    def target(self) -> Optional[int]:
        """Branch target address of a BRA, else None."""
        if self.op != "BRA":
            return None
        match = _HEX.search(self.operands)
        return int(match.group(1), 16) if match else None

    @property
    def access_bytes(self) -> int:
        """Bytes per thread of a load or store (4 when the opcode gives no width)."""
        for modifier in reversed(self.opcode.split(".")[1:]):
            if modifier in _WIDTHS:
                return _WIDTHS[modifier]
        return 4


def parse_sass(text: str) -> Dict[str, List[Instruction]]:
    """{function name: instructions in address order} of `cuobjdump -sass` output."""
    functions: Dict[str, List[Instruction]] = {}
    current: Optional[List[Instruction]] = None
    for line in text.splitlines():
        header = _FUNCTION.match(line)
        if header:
            current = functions.setdefault(header.group(1), [])
            continue
        match = _INSTRUCTION.match(line)
        if match is None or current is None:
            continue
        body = match.group(2)
        predicate = None
        pred = _PREDICATE.match(body)
        if pred:
            predicate, body = pred.group(1), body[pred.end():]
        opcode, _, operands = body.partition(" ")
        current.append(Instruction(int(match.group(1), 16), opcode, operands.strip(), predicate))
    return functions


def code_size(instructions: List[Instruction]) -> int:
    """Instructions of a function, without the trailing trap (`BRA` to itself) and padding `NOP`s."""
    end = len(instructions)
    while end and instructions[end - 1].op == "NOP":
        end -= 1
    if end and instructions[end - 1].target == instructions[end - 1].address:
        end -= 1
    return end


@dataclasses.dataclass
class Loop:
    header: int                 # address of the first instruction of the body
    latch: int                  # address of the backward branch
    static: int                 # instructions in the body
    shortest: int               # fewest instructions from header to latch
    loads: Dict[str, int]       # bytes per thread per iteration (static), by opcode: LDG, LDS, LDGSTS (cp.async)
    stores: Dict[str, int]
    children: List["Loop"] = dataclasses.field(default_factory=list)

    def contains(self, other: "Loop") -> bool:
        return self.header <= other.header and other.latch <= self.latch and other is not self


def _body(instructions: List[Instruction], header: int, latch: int) -> List[Instruction]:
    return [i for i in instructions if header <= i.address <= latch]


def _shortest_path(body: List[Instruction], latch: int) -> int:
    """Fewest instructions from the first of `body` through its latch, over forward edges.

    Branches that leave the body (loop exits) are not taken; a path that ends
    (unconditional EXIT, or a jump out of the body) does not reach the latch.
    """
    index = {ins.address: n for n, ins in enumerate(body)}
    infinity = float("inf")
    best = [infinity] * (len(body) + 1)   # best[n]: fewest instructions executed before body[n]
    best[0] = 0
    for n, ins in enumerate(body):
        if best[n] == infinity:
            continue
        cost = best[n] + 1
        if ins.address == latch:
            return int(cost)
        target = ins.target
        falls_through = True
        if target is not None:
            if target in index and index[target] > n:
                best[index[target]] = min(best[index[target]], cost)
            falls_through = ins.conditional
        elif ins.op in ("EXIT", "RET", "BRX", "JMX") and not ins.conditional:
            falls_through = False
        if falls_through:
            best[n + 1] = min(best[n + 1], cost)
    return len(body)   # no path found: the static count


def shortest_doing(body: List[Instruction], latch: int, elements: int, element_bytes: int,
                   exps: int) -> Optional[int]:
    """Fewest instructions from the first of `body` through its latch on a path that loads at least
    `elements` elements (LDG/LDS bytes / element_bytes) and runs at least `exps` MUFU.EX2: the
    cheapest path that still does an iteration's per-element work.  None if no path does."""
    index = {ins.address: n for n, ins in enumerate(body)}
    # states[n]: {(elements loaded, exps run) capped: fewest instructions before body[n]}
    states: List[Dict[tuple, int]] = [dict() for _ in range(len(body) + 1)]
    states[0][(0, 0)] = 0
    best = None
    for n, ins in enumerate(body):
        if not states[n]:
            continue
        gain_e = ins.access_bytes // element_bytes if ins.op in ("LDG", "LDS") else 0
        gain_x = 1 if ins.opcode.startswith("MUFU.EX2") else 0
        target = ins.target
        for (e, x), cost in states[n].items():
            state = (min(elements, e + gain_e), min(exps, x + gain_x))
            cost += 1
            if ins.address == latch:
                if state == (elements, exps) and (best is None or cost < best):
                    best = cost
                continue
            nexts = []
            falls_through = True
            if target is not None:
                if target in index and index[target] > n:
                    nexts.append(index[target])
                falls_through = ins.conditional
            elif ins.op in ("EXIT", "RET", "BRX", "JMX") and not ins.conditional:
                falls_through = False
            if falls_through:
                nexts.append(n + 1)
            for m in nexts:
                if cost < states[m].get(state, float("inf")):
                    states[m][state] = cost
    return best


def _traffic(body: List[Instruction], ops) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for ins in body:
        if ins.op in ops:
            out[ins.op] = out.get(ins.op, 0) + ins.access_bytes
    return out


def find_loops(instructions: List[Instruction]) -> List[Loop]:
    """The loops of one function in address order, each with its directly nested `children`."""
    latches: Dict[int, int] = {}
    for ins in instructions:
        target = ins.target
        if target is not None and target < ins.address:
            latches[target] = max(latches.get(target, ins.address), ins.address)
    loops = []
    for header, latch in sorted(latches.items()):
        body = _body(instructions, header, latch)
        loops.append(Loop(header, latch, len(body), _shortest_path(body, latch),
                          _traffic(body, ("LDG", "LDS", "LDGSTS")), _traffic(body, ("STG", "STS"))))
    for loop in loops:
        parents = [p for p in loops if p.contains(loop)]
        if parents:
            min(parents, key=lambda p: p.latch - p.header).children.append(loop)
    return loops


def top_level(loops: List[Loop]) -> List[Loop]:
    """Loops that no other loop contains, in address order."""
    return sorted((l for l in loops if not any(p.contains(l) for p in loops)), key=lambda l: l.header)


def executed(loop: Loop, trips, count: str = "static") -> float:
    """Instructions one iteration of `loop` executes when each inner loop runs trips(inner) times.

    `count` is "static" or "shortest" (see the module docstring); the inner loops'
    own bodies are counted once in the outer figure, so they are added trips - 1 more times.
    """
    total = float(getattr(loop, count))
    for child in loop.children:
        total += (trips(child) - 1) * executed(child, trips, count) + \
            (executed(child, trips, count) - getattr(child, count))
    return total


def resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    """{function: {REG, STACK, SHARED, LOCAL}} from `cuobjdump --dump-resource-usage`."""
    out: Dict[str, Dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^\s*Function\s+(\S+?):?\s*$", line)
        if match:
            current = match.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return out
