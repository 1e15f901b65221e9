"""Reading sm_90 SASS: resources, instruction mix, loops and per-element costs of one kernel.

Everything here is static: it reads what cuobjdump prints for a cubin (the cuobjdump in
Triton's wheel, triton/backends/nvidia/bin) and never runs the code.

Per-element costs come from one of three readings, chosen per kernel by bench.static.families
(the third, "shared_loops", is in bench.static.report: the innermost loops with MUFU ops of a
kernel that reads its row from shared memory, each divided by 8 elements per LDS.128 in it):
- "loops": the innermost loops (a backward branch and the code it jumps back over), each
  divided by the elements one thread handles per iteration: the steady state of a
  chunked sweep.
- "path": the whole kernel as it runs for given launch-parameter values (e.g. kind =
  sigmoid), divided by the elements per thread: for fully unrolled kernels with no loop.
  Branches whose predicate is a comparison of a known parameter (read from the constant
  bank) are resolved; other branches keep both sides (counted once, as the code is
  straight-line); blocks that call a subroutine (the slow path of a correctly rounded
  reciprocal or division) are cold and not counted.  Predicated-off instructions are
  counted: they still take an issue slot.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
from collections import Counter
from pathlib import Path

# sm_90 kernels read their parameters from constant bank 0 at this offset.
PARAM_BASE = 0x210

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_FUNCTION = re.compile(r"Function : (\S+)")
_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_KPARAM = re.compile(r"Ordinal : (0x[0-9a-f]+)\s+Offset\s+: (0x[0-9a-f]+)\s+Size\s+: (0x[0-9a-f]+)")
_CBANK = re.compile(r"^c\[0x0\]\[(0x[0-9a-f]+)\]$")
_MMA = ("HGMMA", "QGMMA", "IGMMA", "BGMMA", "HMMA", "IMMA", "QMMA")


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    pred: str | None  # "P0", "!P0", "UP1", ... or None
    op: str           # the opcode with its modifiers, e.g. "HGMMA.64x128x16.F32.BF16"
    operands: tuple[str, ...]

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def tools_dir() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@functools.lru_cache(maxsize=None)
def _cuobjdump(cubin: str, flag: str) -> str:
    done = subprocess.run([str(tools_dir() / "cuobjdump"), flag, cubin], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} {cubin} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """{kernel name: instructions} of cuobjdump -sass output."""
    kernels: dict[str, list[Instr]] = {}
    current = None
    for line in text.splitlines():
        found = _FUNCTION.search(line)
        if found:
            current = kernels.setdefault(found.group(1), [])
            continue
        match = _LINE.search(line)
        if match and current is not None:
            pred = match.group(2).strip().lstrip("@") if match.group(2) else None
            operands = tuple(x.strip() for x in match.group(4).split(",")) if match.group(4).strip() else ()
            current.append(Instr(int(match.group(1), 16), pred, match.group(3), operands))
    return kernels


def sass(cubin: str) -> dict[str, list[Instr]]:
    return parse_sass(_cuobjdump(cubin, "-sass"))


def resources(cubin: str) -> dict[str, dict]:
    """{kernel name: registers, stack, static shared and local bytes} from cuobjdump -res-usage."""
    return {m.group(1): {"registers": int(m.group(2)), "stack_bytes": int(m.group(3)),
                         "static_smem_bytes": int(m.group(4)), "local_bytes": int(m.group(5))}
            for m in _RESOURCES.finditer(_cuobjdump(cubin, "-res-usage"))}


def param_offsets(cubin: str, kernel: str) -> dict[int, int]:
    """{parameter ordinal: constant-bank offset} of one kernel, from its EIATTR_KPARAM_INFO."""
    text = _cuobjdump(cubin, "-elf")
    start = text.find(f"\n.nv.info.{kernel}\n")  # the section itself, not its row in the table
    if start < 0:
        raise KeyError(f"no .nv.info section for {kernel}")
    end = text.find("\n.nv.info.", start + 1)
    section = text[start:end if end > 0 else len(text)]
    return {int(m.group(1), 16): PARAM_BASE + int(m.group(2), 16) for m in _KPARAM.finditer(section)}


def code(instrs: list[Instr]) -> list[Instr]:
    """The kernel's instructions without the padding after its last EXIT/BRA (NOPs, the
    self-branch that ends every function)."""
    body = [i for i in instrs if i.op != "NOP"]
    while body and body[-1].op == "BRA" and body[-1].pred is None and _target(body[-1]) == body[-1].addr:
        body.pop()
    return body


def _target(instr: Instr) -> int | None:
    for operand in reversed(instr.operands):
        if re.fullmatch(r"0x[0-9a-f]+", operand):
            return int(operand, 16)
    return None


# ---- loops ---------------------------------------------------------------------------------

def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last address) of each loop: a branch back to an earlier address."""
    found = []
    for instr in code(instrs):
        if instr.base == "BRA":
            target = _target(instr)
            if target is not None and target < instr.addr:
                found.append((target, instr.addr))
    return sorted(set(found))


def innermost(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def within(instrs: list[Instr], span: tuple[int, int]) -> list[Instr]:
    return [i for i in code(instrs) if span[0] <= i.addr <= span[1]]


# ---- the path taken for known parameter values ---------------------------------------------

_COMPARE = {"EQ": lambda a, b: a == b, "NE": lambda a, b: a != b, "LT": lambda a, b: a < b,
            "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b, "GE": lambda a, b: a >= b}


def _known_branches(instrs: list[Instr], constants: dict[int, int]) -> dict[int, bool]:
    """{address of a conditional BRA: taken?} for branches decided by known constant-bank values.

    A linear scan in address order: registers loaded from a known constant-bank word
    (LDC/ULDC/MOV) hold its value until overwritten; ISETP on known operands defines a
    known predicate.  Enough for `if (p.kind == 2)` on a kernel parameter."""
    regs: dict[str, int] = {}
    preds: dict[str, bool] = {}
    decided: dict[int, bool] = {}

    def value(operand: str):
        if operand in ("RZ", "URZ"):
            return 0
        if re.fullmatch(r"-?0x[0-9a-f]+|-?\d+", operand):
            return int(operand, 0)
        bank = _CBANK.match(operand)
        if bank:
            return constants.get(int(bank.group(1), 16))
        return regs.get(operand)

    for instr in instrs:
        dest = instr.operands[0] if instr.operands else None
        if instr.base == "BRA" and instr.pred:
            name = instr.pred.lstrip("!")
            if name in preds:
                decided[instr.addr] = preds[name] != instr.pred.startswith("!")
            continue
        if instr.pred:  # a predicated write may or may not happen: forget the destination
            regs.pop(dest, None)
            preds.pop(dest, None)
            continue
        if instr.base in ("LDC", "ULDC", "MOV", "UMOV") and len(instr.operands) == 2:
            known = value(instr.operands[1])
            if known is None:
                regs.pop(dest, None)
            else:
                regs[dest] = known
        elif instr.base in ("ISETP", "UISETP") and ".EX" not in instr.op and len(instr.operands) == 5:
            parts = instr.op.split(".")
            a, b = value(instr.operands[2]), value(instr.operands[3])
            combine = instr.operands[4]
            if parts[1] in _COMPARE and parts[2:3] == ["AND"] and combine in ("PT", "UPT") \
                    and a is not None and b is not None:
                preds[dest] = _COMPARE[parts[1]](a, b)
            else:
                preds.pop(dest, None)
            preds.pop(instr.operands[1], None)
        else:
            for operand in instr.operands[:2]:  # destinations come first
                regs.pop(operand, None)
                preds.pop(operand, None)
    return decided


def path(instrs: list[Instr], constants: dict[int, int]) -> list[Instr]:
    """The instructions of every block reachable for these constant-bank values (see the
    module docstring), each once; blocks that CALL a subroutine excluded."""
    body = code(instrs)
    decided = _known_branches(body, constants)
    index = {instr.addr: n for n, instr in enumerate(body)}
    leaders = {body[0].addr}
    for n, instr in enumerate(body):
        if instr.base in ("BRA", "EXIT", "RET", "BRX", "JMX"):
            if n + 1 < len(body):
                leaders.add(body[n + 1].addr)
            target = _target(instr) if instr.base == "BRA" else None
            if target is not None and target in index:
                leaders.add(target)
    starts = sorted(leaders)
    blocks = {start: body[index[start]:index[end]] if end is not None else body[index[start]:]
              for start, end in zip(starts, starts[1:] + [None])}

    def successors(block: list[Instr]) -> list[int]:
        last = block[-1]
        following = body[index[last.addr] + 1].addr if index[last.addr] + 1 < len(body) else None
        if last.base in ("EXIT", "RET", "BRX", "JMX"):
            return [following] if last.pred and following is not None else []
        if last.base == "BRA":
            target = _target(last)
            if last.pred is None and "DIV" not in last.op:
                return [target]
            taken = decided.get(last.addr)
            if taken is True:
                return [target]
            if taken is False:
                return [following] if following is not None else []
            return [t for t in (target, following) if t is not None]
        return [following] if following is not None else []

    seen, stack = set(), [body[0].addr]
    while stack:
        start = stack.pop()
        if start in seen or start not in blocks:
            continue
        seen.add(start)
        if any(i.base == "CALL" for i in blocks[start]):
            continue  # a slow path through a subroutine: cold
        stack.extend(successors(blocks[start]))
    return [i for start in sorted(seen) if not any(x.base == "CALL" for x in blocks[start]) for i in blocks[start]]


# ---- what the instructions are -------------------------------------------------------------

def _width(op: str) -> int:
    """Bytes per thread of a global/shared load or store opcode (LDG.E.128 -> 16)."""
    for part in op.split(".")[1:]:
        if part in ("128", "64", "32", "U16", "S16", "U8", "S8"):
            return {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[part]
    return 4


def census(instrs: list[Instr]) -> dict:
    """Counts over these instructions (static: each instruction once)."""
    ops = Counter(i.base for i in instrs)
    mma = Counter(i.op for i in instrs if i.base in _MMA)
    waits = [int(i.operands[-1], 0) for i in instrs if i.op.startswith("WARPGROUP.DEPBAR")]
    return {
        "instructions": len(instrs),
        "mufu": sum(1 for i in instrs if i.base == "MUFU"),
        "mufu_ops": dict(sorted(Counter(i.op for i in instrs if i.base == "MUFU").items())),
        "mma": dict(sorted(mma.items())),
        "wgmma_waits": waits,
        "tma_loads": ops["UTMALDG"],
        "tma_stores": ops["UTMASTG"],
        "cp_async": ops["LDGSTS"],
        "global_loads": dict(sorted(Counter(f"{_width(i.op)}B" for i in instrs if i.base == "LDG").items())),
        "global_stores": dict(sorted(Counter(f"{_width(i.op)}B" for i in instrs if i.base == "STG").items())),
        "shared_stores": ops["STS"] + ops["STSM"],
        "local_accesses": ops["LDL"] + ops["STL"],
        "barriers": ops["BAR"] + ops["SYNCS"],
    }
