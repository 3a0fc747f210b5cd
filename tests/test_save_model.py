"""prepare.save_model: atomic saves, and a save of the same program again that writes only
its weights (the graph's serialized form is kept from the first save) yet writes the archive
that torch.export.save writes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch._export.serde import serialize as serde

import prepare as P


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(32, 16)
        self.fc = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 32, bias=False)

    def forward(self, idx):
        return self.head(torch.relu(self.fc(self.wte(idx))))


EXAMPLE = torch.randint(0, 32, (2, 8))
DIMS = {"idx": {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=1, max=64)}}


def export(net: Net):
    with torch.no_grad():
        return torch.export.export(net, (EXAMPLE,), dynamic_shapes=DIMS)


@pytest.fixture
def graphs(monkeypatch) -> list[int]:
    """Counts the graph serializations (torch's own serializer, under any memo)."""
    count: list[int] = []
    inner = serde.ExportedProgramSerializer.serialize

    def counting(self, *args, **kwargs):
        count.append(1)
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(serde.ExportedProgramSerializer, "serialize", counting)
    return count


def whole(program) -> bytes:
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def test_a_save_again_serializes_no_graph_and_writes_what_a_whole_save_writes(tmp_path: Path, graphs):
    net = Net()
    program = export(net)
    path = tmp_path / "model.pt2"
    assert P.resave_seconds(program) is None                 # never saved
    P.save_model(program, path)
    assert len(graphs) == 1
    first = P.resave_seconds(program)
    assert first is not None and first >= 0
    with torch.no_grad():                                    # trained in place
        for p in net.parameters():
            p.mul_(-2.0).add_(0.5)
    P.save_model(program, path)
    assert len(graphs) == 1                                  # the graph was not serialized again
    again = path.read_bytes()
    assert again == whole(program)                           # the archive a whole save writes
    assert len(graphs) == 2                                  # torch.export.save itself: no memo
    loaded = torch.export.load(path).module()
    assert torch.allclose(loaded(EXAMPLE), net(EXAMPLE))     # the new weights, not the first
    assert P.resave_seconds(program) is not None


def test_a_changed_graph_or_another_program_is_serialized_anew(tmp_path: Path, graphs):
    net = Net()
    program = export(net)
    path = tmp_path / "model.pt2"
    P.save_model(program, path)
    # The same program object, its graph edited in place: relu becomes sigmoid.
    node = next(n for n in program.graph.nodes if n.target == torch.ops.aten.relu.default)
    node.target = torch.ops.aten.sigmoid.default
    program.graph_module.recompile()
    P.save_model(program, path)
    assert len(graphs) == 2
    assert path.read_bytes() == whole(program)
    want = net.head(torch.sigmoid(net.fc(net.wte(EXAMPLE))))
    assert torch.allclose(torch.export.load(path).module()(EXAMPLE), want)
    # Another trace of another model: its own graph, never the first one's.
    other = Net()
    P.save_model(export(other), path)
    assert len(graphs) == 4                                  # (3: the whole save above)
    assert torch.allclose(torch.export.load(path).module()(EXAMPLE), other(EXAMPLE))


def test_a_failed_save_leaves_the_last_model_and_the_memo_off(tmp_path: Path, graphs):
    net = Net()
    program = export(net)
    path = tmp_path / "model.pt2"
    P.save_model(program, path)
    good = path.read_bytes()
    with pytest.raises(OSError):
        P.save_model(program, tmp_path / "model.pt2" / "not-a-folder" / "x.pt2")
    assert path.read_bytes() == good and not P._MEMO.on
    whole(program)                                           # outside save_model: no memo
    assert len(graphs) == 2


@pytest.mark.parametrize("weights_apart", [True, False])
def test_only_the_graph_is_ever_reused(weights_apart: bool, graphs, monkeypatch):
    """Torch versions differ in what their serializer answers: torch 2.13 asks for the graph
    alone; torch 2.11 asks for everything and writes the weights apart from the answer; older
    ones write the weights from the answer. A reused answer never carries weights: with the
    weights in the answer it is never reused, and a reused one carries none (empty: a torch
    that wrote them would write an invalid model, never the first save's stale weights)."""
    net = Net()
    program = export(net)
    once = P._memoize_graph(serde.serialize, weights_apart)
    monkeypatch.setattr(P._MEMO, "on", True)
    first = once(program)                                   # asked for everything, as 2.11 asks
    assert first.state_dict                                 # the weights, pickled
    again = once(program)
    if weights_apart:
        assert len(graphs) == 1
        assert again.exported_program == first.exported_program
        assert again.state_dict == b"" and again.constants == b""
    else:
        assert len(graphs) == 2 and again.state_dict        # serialized again, weights and all
    alone = once(program, serialize_state_dict=False, serialize_constants=False)
    assert len(graphs) == (2 if weights_apart else 3)        # another request: serialized anew
    assert alone.state_dict == b""
    assert once(program, serialize_state_dict=False, serialize_constants=False) is not first
    assert len(graphs) == (2 if weights_apart else 3)        # and then reused


def test_changed_example_inputs_or_an_unrecompiled_graph_edit_are_serialized_anew(tmp_path: Path, graphs):
    """The serialized graph also holds the example inputs, and the graph's nodes themselves
    (an edit without recompile() leaves the generated code as it was): either change is seen."""
    net = Net()
    program = export(net)
    path = tmp_path / "model.pt2"
    P.save_model(program, path)
    program.example_inputs[0][0].fill_(3)                  # in place
    P.save_model(program, path)
    assert len(graphs) == 2 and path.read_bytes() == whole(program)
    node = next(n for n in program.graph.nodes if n.target == torch.ops.aten.relu.default)
    node.target = torch.ops.aten.sigmoid.default           # no recompile()
    P.save_model(program, path)
    assert len(graphs) == 4 and path.read_bytes() == whole(program)   # (3: the whole save)
