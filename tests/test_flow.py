"""ConditionalFlow: exact invertibility, densities, identity at init, periodicity, conditioning, gradients."""

import math

import pytest
import torch

from openmm_cgflow.flow import ConditionalFlow, rq_spline

@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one torch thread. With two threads on busy shared cores these tests ran ~40x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


N_FINE = 12


def _circular():
    c = torch.zeros(N_FINE, dtype=torch.bool)
    c[[1, 4, 5, 9]] = True
    return c


def _randomise(flow, std=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return flow


def _s(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * math.pi


@pytest.fixture(params=[False, True], ids=["affine_first", "affine_last"])
def flow(request):
    return _randomise(ConditionalFlow(N_FINE, _circular(), 2, [True, True], n_layers=4, hidden=(32, 32),
                                      affine_last=request.param))


def test_spline_inverse_and_logdet_against_autograd():
    torch.manual_seed(0)
    B, K = 500, 8
    circ = torch.tensor([True, False, True, False])
    bound = torch.where(circ, math.pi, 5.0).double()
    raw = torch.randn(B, 4, 3 * K + 1, dtype=torch.float64)
    x = torch.where(circ, (torch.rand(B, 4, dtype=torch.float64) * 2 - 1) * math.pi, torch.randn(B, 4, dtype=torch.float64) * 3)
    x.requires_grad_(True)
    y, ld = rq_spline(x, raw, bound, circ)
    dydx = torch.autograd.grad(y.sum(), x)[0]
    assert torch.allclose(dydx.log(), ld, atol=1e-10)
    x2, ld2 = rq_spline(y.detach(), raw, bound, circ, inverse=True)
    assert torch.allclose(x2, x.detach(), atol=1e-9)
    assert torch.allclose(ld2, -ld.detach(), atol=1e-9)
    # identity tails outside the bound for non-circular dims
    out = x.detach().abs() > 5.0
    assert out.any() and torch.equal(y.detach()[out], x.detach()[out]) and (ld.detach()[out] == 0).all()


def test_round_trip_log_prob(flow):
    s = _s(256)
    fine, log_q = flow.sample(s, generator=torch.Generator().manual_seed(1))
    assert fine.dtype == torch.float64 and fine.shape == (256, N_FINE) and log_q.shape == (256,)
    assert (log_q - flow.log_prob(fine, s)).abs().max() < 1e-8


def test_inverse_of_forward(flow):
    s = _s(128)
    z = flow.sample_base(128, torch.Generator().manual_seed(2))
    fine, ld = flow.forward_transform(z, s)
    z2, ld2 = flow.inverse_transform(fine, s)
    assert (z2 - z).abs().max() < 1e-9
    assert (ld + ld2).abs().max() < 1e-9


def test_identity_at_init():
    flow = ConditionalFlow(N_FINE, _circular(), 2, [True, True], n_layers=4, hidden=(32,))
    s = _s(64)
    z = flow.sample_base(64, torch.Generator().manual_seed(0))
    fine, ld = flow.forward_transform(z, s)
    assert torch.allclose(fine, z, atol=1e-12)
    assert ld.abs().max() < 1e-12
    fine, log_q = flow.sample(s)
    assert torch.allclose(log_q, flow.base_log_prob(fine), atol=1e-12)


def test_circular_dims_stay_in_range(flow):
    s = _s(2000)
    fine, _ = flow.sample(s, generator=torch.Generator().manual_seed(4))
    c = flow.circular
    assert (fine[:, c] >= -math.pi).all() and (fine[:, c] < math.pi).all()
    assert fine[:, c].min() < -3.0 and fine[:, c].max() > 3.0  # the whole circle is used


def test_conditioning_changes_samples(flow):
    g = 5
    s1 = torch.zeros(500, 2, dtype=torch.float64)
    s2 = torch.full((500, 2), 2.0, dtype=torch.float64)
    f1, _ = flow.sample(s1, generator=torch.Generator().manual_seed(g))
    f2, _ = flow.sample(s2, generator=torch.Generator().manual_seed(g))
    assert (f1 - f2).abs().max() > 1e-3
    # the same s with the same base samples is deterministic
    f3, _ = flow.sample(s1, generator=torch.Generator().manual_seed(g))
    assert torch.equal(f1, f3)


def test_training_steps_make_flow_depend_on_s():
    """From the identity, a few max-likelihood steps on s-dependent data make q depend on s."""
    torch.manual_seed(0)
    flow = ConditionalFlow(3, [False, True, False], 1, [True], n_layers=2, hidden=(32,), dtype=torch.float32)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(30):
        s = (torch.rand(256, 1) * 2 - 1) * math.pi
        fine = torch.stack([torch.sin(s[:, 0]) * 2, torch.rand(256) * 0.5, 0.3 * torch.randn(256)], 1)
        loss = -flow.log_prob(fine, s).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(0)
    a, _ = flow.sample(torch.full((2000, 1), -1.5), generator=g)
    b, _ = flow.sample(torch.full((2000, 1), 1.5), generator=g)
    assert a[:, 0].mean() < b[:, 0].mean() - 1.0


def test_gradients_reach_all_parameters(flow):
    s = _s(64)
    fine, log_q = flow.sample(s)
    (log_q + (fine**2).sum(1)).mean().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in flow.parameters()) > 0


def test_gradient_reaches_last_layer_at_identity():
    flow = ConditionalFlow(N_FINE, _circular(), 2, [True, True], n_layers=2, hidden=(16,))
    fine, log_q = flow.sample(_s(64))
    (log_q + (fine**2).sum(1)).mean().backward()
    for layer in flow.layers:
        assert layer.conditioner.net[-1].weight.grad.abs().sum() > 0


def test_one_dimensional_conditional_spline_is_bimodal_capable():
    """n_fine = 1 (Mueller-Brown): parameters depend on s only; max likelihood fits a bimodal conditional."""
    torch.manual_seed(0)
    flow = ConditionalFlow(1, [False], 1, [False], n_layers=2, hidden=(32,), n_bins=12, cg_loc=[0.0], cg_scale=[1.0])
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    for _ in range(300):
        s = torch.rand(512, 1, dtype=torch.float64) * 2 - 1
        sign = torch.where(torch.rand(512, 1, dtype=torch.float64) < 0.5, -1.0, 1.0)
        fine = sign * (1.0 + s) * 1.5 + 0.2 * torch.randn(512, 1, dtype=torch.float64)
        loss = -flow.log_prob(fine, s).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, log_q = flow.sample(torch.full((4000, 1), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    assert (log_q - flow.log_prob(x, torch.full((4000, 1), 0.5, dtype=torch.float64))).abs().max() < 1e-8
    near_zero = (x.abs() < 0.6).double().mean()
    assert near_zero < 0.1  # two modes at +-2.25, little mass in between
    assert 0.35 < (x > 0).double().mean() < 0.65


def test_float32_option():
    flow = ConditionalFlow(N_FINE, _circular(), 2, [True, False], n_layers=2, hidden=(16,), dtype=torch.float32,
                           cg_loc=[0.0, -0.7], cg_scale=[1.0, 1.8])
    s = _s(32).float()
    fine, log_q = flow.sample(s)
    assert fine.dtype == torch.float32 and log_q.dtype == torch.float32
    assert torch.allclose(flow.log_prob(fine, s), log_q, atol=1e-4)


def test_construction_leaves_the_global_rng_alone_and_is_determined_by_the_seed():
    """Building a flow never changes torch's global RNG state; the same seeds give the same flow."""
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = ConditionalFlow(N_FINE, _circular(), 2, [True, True], n_layers=2, hidden=(16,), seed=5, init_seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(3)  # a different global state must not matter
    b = ConditionalFlow(N_FINE, _circular(), 2, [True, True], n_layers=2, hidden=(16,), seed=5, init_seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    # init_seed defaults to seed
    c = ConditionalFlow(N_FINE, _circular(), 2, [True, True], n_layers=2, hidden=(16,), seed=5)
    d = ConditionalFlow(N_FINE, _circular(), 2, [True, True], n_layers=2, hidden=(16,), seed=5, init_seed=5)
    assert all(torch.equal(c.state_dict()[k], d.state_dict()[k]) for k in sa)
    e = ConditionalFlow(N_FINE, _circular(), 2, [True, True], n_layers=2, hidden=(16,), seed=5, init_seed=8)
    assert not torch.equal(a.layers[0].conditioner.net[0].weight, e.layers[0].conditioner.net[0].weight)


def test_device_names_resolve_or_fail_clearly():
    import torch

    from openmm_cgflow.flow import resolve_device

    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a torch device name"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
