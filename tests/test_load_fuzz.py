"""A fuzzer for ``etp_fx.load``: a valid ``.pt2`` file, mutated (truncated, bits flipped in the
file or in one member, member contents swapped, members renamed, deleted or added, a few of
these at once) must end in :class:`etp_fx.LoadError` or in a model whose outputs equal the
original's on a fixed input, bit for bit. Anything else (a ``KeyError``, ``UnicodeDecodeError``,
a ``RuntimeError`` from torch, a model that computes something else) is a bug.

The default run is 150 derandomised examples on a two-layer model (a few seconds); the
``slow`` variant draws 2,000 fresh ones."""
from __future__ import annotations

import io
import warnings
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import etp_fx

FIXED_INPUT = torch.linspace(-2, 2, 3 * 6).reshape(3, 6)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """``(bytes of a valid .pt2, member list, expected output, folder for mutants)``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    small = etp_fx.compress(net, torch.randn(2, 6), ratio=0.5)
    folder = tmp_path_factory.mktemp("fuzz")
    path = etp_fx.save(small, folder / "m.pt2")
    data = path.read_bytes()
    with torch.no_grad():
        want = etp_fx.load(path)(FIXED_INPUT)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    return data, members, want, folder


# --- mutations -----------------------------------------------------------------------------------
# structural ones act on the member list (the archive is rebuilt with valid CRCs, so only the
# manifest can tell); byte-level ones act on the file as written

def _flip_in_member(members, i, pos, bit):
    i %= len(members)
    name, data = members[i]
    if data:
        b = bytearray(data)
        b[pos % len(b)] ^= 1 << bit
        data = bytes(b)
    return members[:i] + [(name, data)] + members[i + 1:]


def _swap(members, i, j):
    i, j = i % len(members), j % len(members)
    out = list(members)
    out[i], out[j] = (members[i][0], members[j][1]), (members[j][0], members[i][1])
    return out


def _rename(members, i, new):
    i %= len(members)
    return members[:i] + [(new(members), members[i][1])] + members[i + 1:]


def _delete(members, i):
    i %= len(members)
    return members[:i] + members[i + 1:]


def _add(members, new, data):
    return members + [(new(members), data)]


# a new name: another member's (a duplicate), one with a suffix, or free text under the root
names = st.one_of(
    st.integers(0, 64).map(lambda k: lambda ms: ms[k % len(ms)][0] if ms else "m/x"),
    st.tuples(st.integers(0, 64), st.sampled_from(["~", ".bak", "/", "0"])).map(
        lambda t: lambda ms: (ms[t[0] % len(ms)][0] if ms else "m/x") + t[1]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
            max_size=12).map(lambda s: lambda ms: "m/" + s),
)

structural = st.one_of(
    st.tuples(st.just(_flip_in_member), st.integers(0, 64), st.integers(0, 1 << 20),
              st.integers(0, 7)),
    st.tuples(st.just(_swap), st.integers(0, 64), st.integers(0, 64)),
    st.tuples(st.just(_rename), st.integers(0, 64), names),
    st.tuples(st.just(_delete), st.integers(0, 64)),
    st.tuples(st.just(_add), names, st.binary(max_size=64)),
)

byte_level = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                   st.integers(0, 7)), min_size=1, max_size=4)),
)


def _rebuild(members) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore")  # "Duplicate name": wanted here
        for name, data in members:
            z.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def _apply(original, steps, tail) -> bytes:
    data, members, _, _ = original
    if steps:
        for f, *params in steps:
            if not members and f is not _add:
                continue
            members = f(members, *params)
        data = _rebuild(members)
    for kind, arg in tail:
        if kind == "truncate":
            data = data[: int(arg * len(data))]
        elif data:
            b = bytearray(data)
            for where, bit in arg:
                b[int(where * len(b))] ^= 1 << bit
            data = bytes(b)
    return data


def _check(original, steps, tail, note=lambda what: None) -> None:
    *_, want, folder = original
    path = folder / "mutant.pt2"
    path.write_bytes(_apply(original, steps, tail))
    try:
        model = etp_fx.load(path)
    except etp_fx.LoadError as e:
        assert str(path) in str(e)  # the message names the file
        note(f"refused: {str(e)[len(str(path)):].split(':')[0].strip()[:40]}")
        return
    note("loaded")  # hypothesis statistics: how many mutants were harmless
    with torch.no_grad():
        got = model(FIXED_INPUT)
    assert torch.equal(got, want), "a mutated file loaded as a model that computes differently"


MUTANTS = dict(steps=st.lists(structural, max_size=3), tail=st.lists(byte_level, max_size=2))
QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
         HealthCheck.data_too_large]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=QUIET)
@given(**MUTANTS)
def test_a_mutated_file_is_refused_or_loads_unchanged(original, steps, tail):
    _check(original, steps, tail, event)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=QUIET)
@given(**MUTANTS)
def test_a_mutated_file_is_refused_or_loads_unchanged_soak(original, steps, tail):
    _check(original, steps, tail, event)


def test_the_unmutated_rebuild_loads_unchanged(original):
    # the fuzzer's own rebuild keeps every member: such a file must load (else every
    # structural mutant would be refused for the wrong reason)
    _check(original, [(_swap, 0, 0)], [])
    *_, want, folder = original
    assert torch.equal(etp_fx.load(folder / "mutant.pt2")(FIXED_INPUT), want)


@pytest.mark.parametrize("steps, tail, phrase", [
    ([(_flip_in_member, 0, 3, 1)], [], "does not match its sha256"),
    ([(_delete, 0)], [], "is missing"),
    ([(_add, lambda ms: "m/extra/evil.py", b"print(1)")], [], "was not written by etp_fx.save"),
    ([(_add, lambda ms: ms[0][0], b"x")], [], "appears more than once"),
    ([], [("truncate", 0.5)], "not a .pt2 archive"),
])
def test_named_mutations(original, steps, tail, phrase):
    *_, folder = original
    path = folder / "named.pt2"
    path.write_bytes(_apply(original, steps, tail))
    with pytest.raises(etp_fx.LoadError, match=phrase):
        etp_fx.load(path)
