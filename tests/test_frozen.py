"""The built-in U-Net's frozen inference graph (``dpmsolver.digits.frozen``): used only where
it computes what the eager forward computes, and never stale."""

from __future__ import annotations

import copy
import pickle
import threading

import torch

from dpmsolver.digits import load_default_model, load_edm_model, load_flow_model
from dpmsolver.digits.network import DigitsUNet

X = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
T = torch.linspace(20.0, 980.0, 12)
Y = torch.arange(12) % 11


def _eager(net: DigitsUNet, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The forward with gradients recorded: always the eager modules."""
    with torch.enable_grad():
        return net(x, t, y).detach()


def _graphs(net: DigitsUNet) -> int:
    return len(net._frozen._graphs)


def test_inference_runs_the_frozen_graph_and_matches_the_eager_forward() -> None:
    net = load_default_model()
    with torch.no_grad():
        out = net(X, T, Y)
        assert _graphs(net) == 1 and not net._frozen._broken
        # other batch sizes, a scalar time and label: the same graph
        small = net(X[:3], 500.0, 4)
    assert _graphs(net) == 1
    torch.testing.assert_close(out, _eager(net, X, T, Y), rtol=1e-4, atol=1e-5)
    want = _eager(net, X[:3], torch.full((3,), 500.0), torch.full((3,), 4))
    torch.testing.assert_close(small, want, rtol=1e-4, atol=1e-5)


def test_training_gradients_and_hooks_keep_the_eager_forward() -> None:
    net = load_default_model()
    _eager(net, X, T, Y)
    assert _graphs(net) == 0  # gradients recorded
    net.train()
    with torch.no_grad():
        net(X, T, Y)
    assert _graphs(net) == 0  # training mode (dropout)
    net.eval()
    seen: list[int] = []
    handle = net.mid_attn.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    with torch.no_grad():
        net(X, T, Y)
    handle.remove()
    assert seen == [12] and _graphs(net) == 0  # a hook must see its module's call


def test_a_weight_written_in_place_or_replaced_rebuilds_the_graph() -> None:
    net = load_default_model()
    with torch.no_grad():
        before = net(X, T, Y)
        net.conv_out.bias.add_(0.25)  # an EMA update writes in place
        after = net(X, T, Y)
    torch.testing.assert_close(after, before + 0.25, rtol=0, atol=1e-5)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["conv_out.bias"] -= 0.5
    net.load_state_dict(state, assign=True)  # new tensors
    with torch.no_grad():
        again = net(X, T, Y)
    torch.testing.assert_close(again, before - 0.25, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, _eager(net, X, T, Y), rtol=1e-4, atol=1e-5)


def test_a_copy_gets_its_own_graph() -> None:
    net = load_default_model()
    with torch.no_grad():
        net(X, T, Y)
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert _graphs(other) == 0
        with torch.no_grad():
            other.conv_out.bias.fill_(1.0)
            out = other(X, T, Y)
        torch.testing.assert_close(out, _eager(other, X, T, Y), rtol=1e-4, atol=1e-5)


def test_threads_share_one_graph() -> None:
    net = load_default_model()
    want = _eager(net, X, T, Y)
    outs: list[torch.Tensor] = []

    def call() -> None:
        with torch.no_grad():
            outs.append(net(X, T, Y))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(outs) == 4 and _graphs(net) == 1
    for out in outs:
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_the_edm_model_runs_its_unet_frozen() -> None:
    edm = load_edm_model()
    sigma = torch.logspace(-2, 1.5, 12)
    with torch.no_grad():
        out = edm(X, sigma, Y)
    assert _graphs(edm.net) == 1
    with torch.enable_grad():
        want = edm(X, sigma, Y).detach()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_the_flow_transformer_runs_frozen() -> None:
    flow = load_flow_model()
    with torch.no_grad():
        out = flow(X, T, Y)
        small = flow(X[:3], 500.0, 4)
    assert len(flow._frozen._graphs) == 1 and not flow._frozen._broken
    with torch.enable_grad():
        want = flow(X, T, Y).detach()
        want_small = flow(X[:3], 500.0, 4).detach()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(small, want_small, rtol=1e-4, atol=1e-5)
