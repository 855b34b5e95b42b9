"""LoRA slot bookkeeping: slots are reused least-recently-used among adapters no running sequence uses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kubeinfer_serving.lora.adapter import AdapterLoadError, LoRAAdapter, LoRAShapes, ModuleShape
from kubeinfer_serving.lora.manager import LoRAManager
from kubeinfer_serving.lora.slots import LoRASlots

SHAPES = LoRAShapes(1, {"qkv": ModuleShape(4, (4, 2, 2)), "o": ModuleShape(4, (4,)),
                        "gate_up": ModuleShape(4, (6, 6)), "down": ModuleShape(6, (4,))})


def _adapter(name: str, value: float, rank: int = 2) -> LoRAAdapter:
    a = torch.full((rank, 4), value)
    return LoRAAdapter(name, name.encode(), rank, {(0, "q_proj"): (a, torch.full((4, rank), value))})


def _seq(adapter):
    return SimpleNamespace(lora=adapter)


@pytest.fixture
def manager():
    m = LoRAManager(LoRASlots(SHAPES, 2, 4, torch.float32, torch.device("cpu")))
    for name, v in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        m.add(_adapter(name, v))
    return m


def test_slots_are_reused_lru_among_idle_adapters(manager):
    a, b, c = (manager.get(n) for n in "abc")
    sa, sb = _seq(a), _seq(b)
    assert manager.acquire(sa) and manager.acquire(sb)
    assert not manager.acquire(_seq(c)), "both slots pinned by running sequences: c waits"
    manager.release(sb)
    manager.release(sa)  # a released last: b is the least recently used idle adapter
    sc = _seq(c)
    assert manager.acquire(sc)
    assert sorted(manager.resident()) == ["a", "c"] and manager.num_evictions == 1
    slot = manager.slot_of(c)
    assert torch.equal(manager.slots.a[0]["qkv"][slot, :2], torch.full((2, 4), 3.0))
    assert manager.slots.a[0]["qkv"][slot, 2:].abs().sum() == 0, "rank padding and other slices stay zero"
    assert torch.equal(manager.slots.b[0]["qkv"][slot, :4, :2], torch.full((4, 2), 3.0))
    assert manager.acquire(_seq(a)) and manager.num_loads == 3, "a was still resident: no load"
    assert manager.running_counts() == {"a": 1, "c": 1}


def test_removed_adapter_keeps_serving_its_running_sequences(manager):
    a = manager.get("a")
    sa = _seq(a)
    assert manager.acquire(sa)
    assert manager.remove("a") is a and "a" not in manager.adapters
    assert manager.resident() == ["a"]
    manager.release(sa)
    assert manager.resident() == [], "its slot is freed once its last sequence leaves"


def test_rank_and_name_checks(manager):
    with pytest.raises(AdapterLoadError, match="rank 8 exceeds maxLoraRank 4"):
        manager.add(_adapter("big", 1.0, rank=8))
    with pytest.raises(ValueError, match="already loaded"):
        manager.add(_adapter("a", 1.0))
