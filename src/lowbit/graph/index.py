"""Lookups over a protobuf graph that lowbit reads but does not edit (graph/io.py says where and why raw protobuf
is kept): who produces a tensor, who reads it, which initializer holds it."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


class GraphIndex:
    """Nodes by position; each tensor's producer and consumers as positions, or as nodes; initializers by name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = list(graph.node)
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for t in n.input:
                if t:
                    self.consumers[t].append(i)

    def op_of(self, tensor: str) -> str | None:
        node = self.producer_node(tensor)
        return None if node is None else node.op_type

    def readers(self, i: int) -> list[int]:
        """Positions of the nodes reading any output of node i."""
        return [c for o in self.nodes[i].output for c in self.consumers.get(o, [])]

    def producer_node(self, tensor: str) -> onnx.NodeProto | None:
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i]

    def reader_nodes(self, tensor: str) -> list[onnx.NodeProto]:
        return [self.nodes[i] for i in self.consumers.get(tensor, [])]

    def constant(self, name: str) -> np.ndarray | None:
        """The initializer's value as a numpy array, or None when `name` is not an initializer."""
        t = self.inits.get(name)
        if t is None:
            return None
        value: np.ndarray = numpy_helper.to_array(t)
        return value
