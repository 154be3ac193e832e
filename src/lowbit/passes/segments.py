"""Run a model a piece at a time: nodes in graph order up to a chosen node, then stop, so the caller can change that
node's output before the rest of the graph reads it (empirical bias correction does: bias_empirical.py).

Every node runs once in all: each piece is a small model of the nodes since the last stop, fed with the tensors
still alive from earlier pieces (kept for every batch in memory) and ONNX Runtime's float simulation
(`ORT_DISABLE_ALL`: QDQ pairs run as written). Memory is the largest set of tensors alive across a stop, for
every calibration sample."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..runtimes.ort import session


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs, and the outer-scope names its subgraphs (If/Loop bodies) read."""
    names = [i for i in node.input if i]
    for a in node.attribute:
        for g in [a.g] if a.HasField("g") else list(a.graphs):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
            names += [r for n in g.node for r in _reads(n) if r not in inner]
    return names


class Segments:
    """`proto`'s nodes (topologically sorted) run piece by piece over `batches`."""

    def __init__(self, proto: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> None:
        self.proto = proto
        self.nodes = list(proto.graph.node)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.inits = {i.name: i for i in proto.graph.initializer}
        self.last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for r in _reads(n):
                self.last[r] = i
        inputs = {i.name for i in proto.graph.input} - set(self.inits)
        self.state: dict[str, list[np.ndarray]] = {k: [b[k] for b in batches] for k in inputs if k in batches[0]}
        self.done = 0  # nodes before this index have run

    def run_to(self, name: str) -> list[np.ndarray]:
        """Run every node up to and including `name`; its first output, one array per batch."""
        stop = self.index[name]
        assert stop >= self.done, f"{name} has already run"
        for k in [k for k in self.state if self.last.get(k, -1) < self.done]:
            del self.state[k]  # no node from here on reads it
        piece = self.nodes[self.done : stop + 1]
        made = {o for n in piece for o in n.output if o}
        wanted = [o for o in dict.fromkeys(o for n in piece for o in n.output if o) if self.last.get(o, -1) > stop]
        target = self.nodes[stop].output[0]
        outs = list(dict.fromkeys([*wanted, target]))
        reads = [r for r in dict.fromkeys(r for n in piece for r in _reads(n)) if r not in made]
        feeds = [r for r in reads if r in self.state]
        inits = [self.inits[r] for r in reads if r in self.inits]
        graph = helper.make_graph(
            piece,
            "piece",
            [helper.make_tensor_value_info(r, _elem(self.state[r][0]), None) for r in feeds],
            [onnx.ValueInfoProto(name=o) for o in outs],
            inits,
        )
        model = helper.make_model(graph, opset_imports=list(self.proto.opset_import))
        model.ir_version = self.proto.ir_version
        sess = session(model, mode="simulate", spin=False)
        got: list[list[np.ndarray]] = [[] for _ in outs]
        for b in range(len(next(iter(self.state.values()))) if self.state else 0):
            for i, v in enumerate(sess.run(outs, {r: self.state[r][b] for r in feeds})):
                got[i].append(v)
        self.state.update(zip(outs, got))
        self.done = stop + 1
        return self.state[target]

    def replace(self, name: str, values: list[np.ndarray]) -> None:
        """What the later pieces read as `name` (one array per batch)."""
        self.state[name] = values


def _elem(a: np.ndarray) -> int:
    return int(helper.np_dtype_to_tensor_dtype(a.dtype))
