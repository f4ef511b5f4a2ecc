"""hypernet/ on random float64 tensors: the solve, its backward, the networks."""
import ast
from pathlib import Path

import pytest
import torch

from hypernet import HyperNetwork, RunningNorm, factorize, least_squares, solve, solve_backward

torch.manual_seed(0)
F64 = torch.float64


def problem(n, d_k=12, d_v=5):
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(*shape, generator=g, dtype=F64)
                 for shape in [(n, d_k), (n, d_v), (d_k, d_v)])


@pytest.mark.parametrize("n", [4, 30])  # fewer and more tokens than d_k
def test_two_forms_agree_and_match_normal_equations(n):
    keys, values, _ = problem(n)
    lam = torch.tensor(0.7, dtype=F64)
    expected = torch.linalg.solve(keys.T @ keys + lam * torch.eye(12, dtype=F64), keys.T @ values)
    for form in ("keys", "tokens", "auto"):
        factor = factorize(keys, lam, F64, form)
        assert torch.allclose(solve(factor, values), expected, atol=1e-10), form
    assert factorize(keys, lam, F64).small == (n < 12)


@pytest.mark.parametrize("n", [4, 30])
def test_backward_matches_autograd(n):
    keys, values, weight = problem(n)
    log_lam = torch.tensor(-0.3, dtype=F64)
    for form in ("keys", "tokens"):
        v = values.clone().requires_grad_()
        ll = log_lam.clone().requires_grad_()
        a = keys.T @ keys + ll.exp() * torch.eye(12, dtype=F64)
        loss = (torch.linalg.solve(a, keys.T @ v) * weight).sum()  # G = weight
        loss.backward()
        factor = factorize(keys, log_lam.exp(), F64, form)
        shift = solve(factor, values)
        grad_values, grad_log_lam = solve_backward(factor, shift, weight)
        assert torch.allclose(grad_values, v.grad, atol=1e-10), form
        assert torch.allclose(grad_log_lam, ll.grad, atol=1e-10), form


@pytest.mark.parametrize("form", ["keys", "tokens"])
def test_autograd_function_passes_gradcheck(form):
    keys, values, _ = problem(6)
    values.requires_grad_()
    log_lam = torch.tensor(0.2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, ll: least_squares(keys, v, ll, F64, form), (values, log_lam))


def test_backward_against_finite_differences():
    keys, values, weight = problem(8)
    log_lam, eps = torch.tensor(0.1, dtype=F64), 1e-6

    def loss(v, ll):
        return (solve(factorize(keys, ll.exp(), F64), v) * weight).sum()

    factor = factorize(keys, log_lam.exp(), F64)
    grad_values, grad_log_lam = solve_backward(factor, solve(factor, values), weight)
    bump = torch.zeros_like(values)
    bump[3, 2] = eps
    fd = (loss(values + bump, log_lam) - loss(values - bump, log_lam)) / (2 * eps)
    assert torch.allclose(fd, grad_values[3, 2], atol=1e-7)
    fd = (loss(values, log_lam + eps) - loss(values, log_lam - eps)) / (2 * eps)
    assert torch.allclose(fd, grad_log_lam, atol=1e-7)


def test_float32_solve_is_close_to_float64():
    keys, values, _ = problem(50, d_k=64, d_v=16)
    lam = torch.tensor(1e-2)
    exact = solve(factorize(keys, lam, F64), values)
    approx = solve(factorize(keys.float(), lam, torch.float32), values.float())
    assert torch.allclose(approx.double(), exact, rtol=1e-3, atol=1e-3)


def test_bad_keys_raise():
    keys, _, _ = problem(5)
    keys[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not positive definite"):
        factorize(keys, torch.tensor(1.0, dtype=F64), F64)
    with pytest.raises(ValueError, match="n x d_k"):
        factorize(torch.zeros(3), torch.tensor(1.0))


def test_running_norm_matches_batch_statistics():
    x = torch.randn(100, 7, dtype=F64) * 3 + 2
    norm = RunningNorm(7)
    for chunk in x.split([13, 40, 47]):
        norm.update(chunk)
    assert torch.allclose(norm.mean, x.mean(0)) and torch.allclose(norm.std, x.std(0))
    assert torch.allclose(norm(x).mean(0), torch.zeros(7, dtype=F64), atol=1e-9)
    state = norm.state_dict()
    assert {"count", "mean", "m2"} <= set(state)  # saved with the network


def test_untrained_network_is_the_identity_on_normalised_inputs():
    shapes = {"a": (12, 5), "b": (12, 5), "c": (8, 3)}
    net = HyperNetwork(shapes, rank=4, n_blocks=2).double()
    assert sorted(net.nets) == ["12x5", "8x3"] and net.index == {"a": 0, "b": 1, "c": 0}
    keys, grads, _ = problem(9)
    net.update_norm("a", keys, grads)
    u, delta = net.net("a")(keys, grads, 0)
    normed = net.net("a").norm(torch.cat([keys, grads], -1))
    assert torch.allclose(torch.cat([u, delta], -1), normed)


@pytest.mark.parametrize("rule", ["malmen", "mend"])
def test_shift_rules(rule):
    net = HyperNetwork({"a": (12, 5)}, rule=rule, rank=4, lr=0.1).double()
    keys, grads, _ = problem(30)
    shift = net.shift("a", keys, grads, F64)
    assert shift.shape == (12, 5)
    u, delta = net.net("a")(keys, grads, 0)
    if rule == "mend":
        expected = -0.1 * u.T @ delta
    else:
        d = -0.1 * (keys * u).sum(-1, keepdim=True) * delta
        expected = torch.linalg.solve(keys.T @ keys + torch.eye(12, dtype=F64), keys.T @ d)
    assert torch.allclose(shift, expected, atol=1e-8)
    shift.sum().backward()  # gradients reach every parameter that shapes the shift
    used = {"log_lr", "blocks.0.up", "blocks.1.up"} | ({"log_lam"} if rule == "malmen" else set())
    grads_of = {n: p.grad for n, p in net.net("a").named_parameters()}
    assert all(grads_of[n] is not None and grads_of[n].abs().sum() > 0 for n in used)
    with pytest.raises(ValueError, match="unknown shift rule"):
        HyperNetwork({"a": (12, 5)}, rule="rome")


def test_hypernet_never_imports_editor():
    for path in Path(__file__).parents[1].joinpath("hypernet").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "editor" for n in names), path
