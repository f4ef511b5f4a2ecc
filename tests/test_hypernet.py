"""hypernet/ on random float64 tensors: the solve, its backward, the networks."""
import ast
from pathlib import Path

import pytest
import torch

from hypernet import HyperNetwork, RunningNorm, solve

torch.manual_seed(0)
F64 = torch.float64


def problem(n, d_k=12, d_v=5):
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(*shape, generator=g, dtype=F64)
                 for shape in [(n, d_k), (n, d_v), (d_k, d_v)])


def unrelated_keys(d_k=12, seed=1):
    """40 keys of unrelated text and their second moment C (a key prior)."""
    x = torch.randn(40, d_k, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x, x.T @ x / 40


def coupled_problem(n, layers=3, d_k=12, d_v=5):
    g = torch.Generator().manual_seed(100 + n)
    keys = [torch.randn(n, d_k, generator=g, dtype=F64) for _ in range(layers)]
    priors = [unrelated_keys(seed=10 + i)[1] for i in range(layers)]
    return keys, torch.randn(n, d_v, generator=g, dtype=F64), priors


def ridge_solve(keys, values, lam, prior=None, mu=None):
    """The normal equations (K^T K + lam I + mu C) S = K^T D, with autograd."""
    a = keys.T @ keys + lam * torch.eye(keys.shape[1], dtype=F64)
    return torch.linalg.solve(a if prior is None else a + mu * prior, keys.T @ values)


@pytest.mark.parametrize("n", [4, 30])  # fewer and more rows than d_k
def test_one_module_is_the_ridge_solve(n):
    keys, values, _ = problem(n)
    _, prior = unrelated_keys()
    for kw in ({}, {"priors": [prior], "mus": [0.5]}):
        got = solve.solve(solve.factorize([keys], [0.7], **kw), values)[0]
        want = ridge_solve(keys, values, 0.7, prior if kw else None, 0.5)
        assert got.dtype == F64 and torch.allclose(got, want, atol=1e-10)
    # float32 inputs are solved in float64
    got = solve.solve(solve.factorize([keys.float()], [0.7]), values.float())[0]
    assert got.dtype == F64 and torch.allclose(got, ridge_solve(keys.float().double(),
                                                                values.float().double(), 0.7))


class Solve(torch.autograd.Function):
    """S_1..S_L = the solve of D with weights exp(log lam_l), exp(log mu_l), differentiable
    through `solve.backward` only (for gradcheck: finite differences against it)."""

    @staticmethod
    def forward(ctx, values, log_lam, log_mu, keys, priors):
        factor = solve.factorize(keys, log_lam.exp(), priors, log_mu.exp())
        shifts = solve.solve(factor, values)
        ctx.factor, ctx.shifts = factor, shifts
        return torch.cat(shifts)

    @staticmethod
    def backward(ctx, grad):
        g, d_lam, d_mu = solve.backward(ctx.factor, ctx.shifts,
                                        grad.split([s.shape[0] for s in ctx.shifts]))
        return g, torch.stack(d_lam), torch.stack(d_mu), None, None


@pytest.mark.parametrize("n", [8, 50])  # fewer and more rows than one module's d_k
def test_backward_passes_gradcheck(n):
    """The one analytic backward (D, log lam_l, log mu_l) against finite differences."""
    keys, values, priors = coupled_problem(n)
    args = (values.clone().requires_grad_(),
            torch.tensor([0.3, -0.5, 1.0], dtype=F64, requires_grad=True),
            torch.tensor([-1.0, 0.2, 0.0], dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda v, a, b: Solve.apply(v, a, b, keys, priors), args)


@pytest.mark.parametrize("n", [20, 50])  # fewer and more rows than one module's d_k
def test_solve_is_the_ridge_solve_over_concatenated_keys(n):
    """The solve equals min ||[K_1..K_L] [S_1; ..; S_L] - D||^2 + sum tr(S^T R S) from the
    normal equations; its backward (D, log lam, log mu) matches autograd through them; the
    joint fit leaves a smaller residual than any module alone when n > d_k."""
    keys, values, priors = coupled_problem(n)
    log_lam = torch.tensor([0.3, -0.5, 1.0], dtype=F64, requires_grad=True)
    log_mu = torch.tensor([-1.0, 0.2, 0.0], dtype=F64, requires_grad=True)
    d = values.clone().requires_grad_()
    ridge = torch.block_diag(*[a.exp() * torch.eye(12, dtype=F64) + b.exp() * c
                               for a, b, c in zip(log_lam, log_mu, priors)])
    k = torch.cat(keys, 1)
    expected = torch.linalg.solve(k.T @ k + ridge, k.T @ d)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    (expected * weights).sum().backward()
    factor = solve.factorize(keys, log_lam.detach().exp(), priors, log_mu.detach().exp())
    shifts = solve.solve(factor, values)
    assert torch.allclose(torch.cat(shifts), expected, atol=1e-10)
    g, d_lam, d_mu = solve.backward(factor, shifts, weights.split(12))
    assert torch.allclose(g, d.grad, atol=1e-10)
    assert torch.allclose(torch.stack(d_lam), log_lam.grad, atol=1e-10)
    assert torch.allclose(torch.stack(d_mu), log_mu.grad, atol=1e-10)
    no_prior = solve.backward(solve.factorize(keys[:1], [0.7]), shifts[:1], [weights[:12]])
    assert no_prior[2] == [None]
    small = [1e-6] * 3
    fit = sum(kk @ s for kk, s in zip(keys, solve.solve(solve.factorize(keys, small), values)))
    alone = [kk @ solve.solve(solve.factorize([kk], [1e-6]), values)[0] for kk in keys]
    residual = [(f - values).norm() / values.norm() for f in [fit, *alone]]
    assert (residual[0] < 1e-4) == (n < 36) and all(r > residual[0] for r in residual[1:])
    if n > 12:
        assert min(residual[1:]) > 0.3


def test_key_prior_keeps_outputs_on_its_keys():
    """The larger mu, the less the shift moves outputs on the prior's keys (and the
    network's log mu gets a gradient); a MEND network cannot hold a prior."""
    keys, grads, _ = problem(30)
    loc, prior = unrelated_keys()
    moved = []
    for log_mu in (-5.0, 0.0, 5.0):
        net = HyperNetwork({"a": (12, 5)}, rank=4, lr=0.1, prior=True, log_mu=log_mu).double()
        net.set_prior("a", prior)
        shift = net.shifts({"a": (keys, grads)})["a"]
        moved.append((loc @ shift).norm().item())
        net.backward({"a": (keys, grads)}, {"a": torch.ones_like(shift)})
        assert net.net("a").log_mu.grad.abs().sum() > 0
    assert moved[0] > moved[1] > moved[2]
    assert net.has_prior and not HyperNetwork({"a": (12, 5)}).has_prior
    with pytest.raises(ValueError, match="must be 12 x 12"):
        net.set_prior("a", torch.eye(5))
    with pytest.raises(ValueError, match="needs the least-squares solve"):
        HyperNetwork({"a": (12, 5)}, rule="mend", prior=True)
    with pytest.raises(ValueError, match="no key prior"):
        HyperNetwork({"a": (12, 5)}).set_prior("a", torch.eye(12))


def test_ill_conditioned_rows_are_solved_exactly():
    """Many more rows than rank against a small lambda: B = I + K R^-1 K^T is positive
    definite but too ill-conditioned for float32 (an untrained editor's at N = 4096 was);
    in float64 the solve, its extension and the running solve equal the normal equations."""
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(400, 16, generator=g) * 30 for _ in range(2)]
    values, lams = torch.randn(400, 8, generator=g), [1e-3, 1e-3]
    k = torch.cat(keys, 1).double()
    exact = torch.linalg.solve(k.T @ k + 1e-3 * torch.eye(32, dtype=F64), k.T @ values.double())
    with pytest.raises(FloatingPointError, match="not positive definite in torch.float32"):
        solve.cholesky(torch.eye(400) + k.float() @ k.float().T / 1e-3, "B")
    got = solve.solve(solve.factorize(keys, lams), values)
    assert torch.allclose(torch.cat(got), exact, atol=1e-8)
    grown = solve.extend(solve.factorize([x[:8] for x in keys], lams), [x[8:] for x in keys])
    assert torch.allclose(torch.cat(solve.solve(grown, values)), exact, atol=1e-8)
    run = solve.start([x[:8] for x in keys], values[:8], lams)
    run, _ = solve.add(run, [x[8:] for x in keys], values[8:])
    assert torch.allclose(torch.cat(run.shifts), exact, atol=1e-8)


def test_bad_keys_raise():
    keys, _, _ = problem(5)
    keys[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        solve.factorize([keys], [1.0])
    with pytest.raises(ValueError, match="n x d_k"):
        solve.factorize([torch.zeros(3)], [1.0])
    with pytest.raises(ValueError, match="the same n rows"):
        solve.factorize([torch.zeros(3, 4), torch.zeros(2, 4)], [1.0, 1.0])


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
    assert net.groups(shapes) == [["a", "b"], ["c"]]
    assert HyperNetwork(shapes, rule="mend").groups(shapes) == [["a"], ["b"], ["c"]]
    keys, grads, _ = problem(9)
    net.update_norm("a", keys, grads)
    u, delta = net.net("a")(keys, grads, 0)
    normed = net.net("a").norm(torch.cat([keys, grads], -1))
    assert torch.allclose(torch.cat([u, delta], -1), normed)


def trained_like(net):
    """Perturb an untrained network's zero-initialised parts so every parameter matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def reference_shift(net, name, keys, grads):
    """The module's shift with autograd through everything (the rule written out)."""
    shape_net, layer = net.net(name), net.index[name]
    if net.rule == "mend":
        u, delta = shape_net(keys, grads, layer)
        return -shape_net.log_lr[layer].exp() * u.T @ delta
    d = shape_net.value_shifts(keys, grads, layer)
    prior = None if shape_net.prior is None else shape_net.prior[layer]
    mu = None if prior is None else shape_net.log_mu[layer].exp()
    return ridge_solve(keys, d, shape_net.log_lam[layer].exp(), prior, mu)


@pytest.mark.parametrize("rule,prior", [("malmen", False), ("malmen", True), ("mend", False)])
def test_chunked_shift_and_backward_equal_one_graph(rule, prior):
    """shifts(chunk=c) and backward(chunk=c) (bounded memory) equal the rule written out with
    autograd, for MALMEN (with and without a key prior) and MEND; the gradient reaches every
    parameter that shapes the shift."""
    keys, grads, weight = problem(30)
    kw = {"prior": True, "log_mu": 0.5} if prior else {}
    net = trained_like(HyperNetwork({"a": (12, 5)}, rule=rule, rank=4, lr=0.1, **kw).double())
    if prior:
        net.set_prior("a", unrelated_keys()[1])
    whole = reference_shift(net, "a", keys, grads)
    (whole * weight).sum().backward()
    expected = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=False)
    assert torch.allclose(net.shifts({"a": (keys, grads)}, chunk=7)["a"], whole.detach(),
                          atol=1e-10)
    net.backward({"a": (keys, grads)}, {"a": weight}, chunk=7)
    for n, p in net.named_parameters():
        got = torch.zeros_like(p) if p.grad is None else p.grad
        assert torch.allclose(got, expected[n], atol=1e-9), n
    used = ["blocks.0.down", "blocks.1.up", "log_lr"] + (["log_lam"] if rule == "malmen" else [])
    for part in used:
        assert expected[f"nets.12x5.{part}"].abs().sum() > 0, part
    with pytest.raises(ValueError, match="unknown shift rule"):
        HyperNetwork({"a": (12, 5)}, rule="rome")


@pytest.mark.parametrize("prior", [False, True])
def test_shared_solve_shifts_and_backward_equal_autograd(prior):
    """shifts() of two same-shape modules (one solve) and a third of another shape (solved
    alone), and backward(chunk=c), equal autograd through the normal equations of the
    concatenated keys with D = D_1 + D_2, reusing the factors `shifts` kept or not."""
    kw = {"prior": True, "log_mu": 0.5} if prior else {}
    shapes = {"a": (12, 5), "b": (12, 5), "c": (8, 5)}
    net = trained_like(HyperNetwork(shapes, rank=4, lr=0.1, **kw).double())
    if prior:
        for i, name in enumerate("ab"):
            net.set_prior(name, unrelated_keys(seed=20 + i)[1])
        net.set_prior("c", unrelated_keys(d_k=8)[1])
    g = torch.Generator().manual_seed(7)
    n = 26
    captured = {name: (torch.randn(n, dk, generator=g, dtype=F64),
                       torch.randn(n, dv, generator=g, dtype=F64)) for name, (dk, dv) in
                shapes.items()}
    weights = {name: torch.randn(*shape, generator=g, dtype=F64) for name, shape in
               shapes.items()}
    e = net.net("a")  # autograd reference for the pair
    d = sum(e.value_shifts(*captured[name], net.index[name]) for name in "ab")
    ridges = []
    for name in "ab":
        i = net.index[name]
        r = e.log_lam[i].exp() * torch.eye(12, dtype=F64)
        ridges.append(r if e.prior is None else r + e.log_mu[i].exp() * e.prior[i])
    k = torch.cat([captured["a"][0], captured["b"][0]], 1)
    pair = torch.linalg.solve(k.T @ k + torch.block_diag(*ridges), k.T @ d)
    alone = reference_shift(net, "c", *captured["c"])
    loss = (pair * torch.cat([weights["a"], weights["b"]])).sum() + (alone * weights["c"]).sum()
    loss.backward()
    expected = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for name, p in net.named_parameters()}
    for factors in ({}, None):
        net.zero_grad(set_to_none=False)
        shifts = net.shifts(captured, chunk=7, factors=factors)
        assert torch.allclose(torch.cat([shifts["a"], shifts["b"]]), pair, atol=1e-10)
        assert torch.allclose(shifts["c"], alone, atol=1e-10)
        net.backward(captured, weights, chunk=7, factors=factors)
        for name, p in net.named_parameters():
            got = torch.zeros_like(p) if p.grad is None else p.grad
            assert torch.allclose(got, expected[name], atol=1e-9), name
    assert expected["nets.12x5.log_lam"].abs().sum() > 0


def test_solve_diagnostics():
    """Few rows are fitted exactly (residual ~0, leverage ~1 with a tiny lambda); many rows
    leave a residual; a large lambda shrinks the leverage; two modules sharing one solve fit
    rows that each alone cannot."""
    few, many = problem(6), problem(60)
    exact = solve.diagnostics([few[0]], few[1], [1e-8])
    assert exact["residual"] < 1e-6 and exact["leverage"] == pytest.approx(1.0, abs=1e-6)
    over = solve.diagnostics([many[0]], many[1], [1e-8])
    assert over["residual"] > 0.3 and over["leverage"] == pytest.approx(12 / 60, rel=1e-4)
    ridge = solve.diagnostics([many[0]], many[1], [1e3])
    assert ridge["leverage"] < 0.1 * over["leverage"] and ridge["residual"] > over["residual"]
    other = problem(61)[0][:60]
    pair = HyperNetwork({"a": (12, 5), "b": (12, 5)}, rank=4, lr=0.1, log_lam=-8.0).double()
    (joint,) = pair.diagnose({"a": many[:2], "b": (other, many[1])}, chunk=7)
    alone = [pair.diagnose({name: (k, many[1])})[0] for name, k in (("a", many[0]), ("b", other))]
    assert joint["modules"] == ["a", "b"] and set(joint) == {"modules", *exact}
    assert joint["leverage"] > 1.5 * max(r["leverage"] for r in alone)
    assert joint["residual"] < min(r["residual"] for r in alone)


def test_factor_extended_by_rows_equals_the_factor_of_all_rows():
    """Rows added in turn (`extend`, twice) give the factor and the solve of all the rows
    factorized at once; keys of another width are refused."""
    keys, values, priors = coupled_problem(50)
    lams, mus = [0.7, 1.3, 0.4], [2.0, 0.5, 1.0]
    factor = solve.factorize([k[:20] for k in keys], lams, priors, mus)
    factor = solve.extend(solve.extend(factor, [k[20:35] for k in keys]), [k[35:] for k in keys])
    full = solve.factorize(keys, lams, priors, mus)
    assert torch.allclose(factor.chol_b, full.chol_b, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(factor.proj, full.proj))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(
        solve.solve(factor, values), solve.solve(full, values)))
    with pytest.raises(ValueError, match="keys must be m x d_k"):
        solve.extend(factor, [k[:3, :5] for k in keys])


def test_rows_added_in_turn_equal_one_solve_in_row_and_key_space():
    """Batches of rows added in turn (`add`: recursive least squares) give the S_l of one
    solve of all the rows: in row space while the rows number at most p = sum_l d_k (36
    here), then once more with P = (K^T K + R)^-1 of all rows, then by Woodbury updates of P,
    which stays exactly symmetric; `start` of more than p rows starts in key space. Keys of
    another width are refused."""
    keys, values, priors = coupled_problem(50)
    lams, mus = [0.7, 1.3, 0.4], [2.0, 0.5, 1.0]
    run = solve.start([k[:10] for k in keys], values[:10], lams, priors, mus)
    total = list(run.shifts)
    for lo, hi, space in [(10, 25, "rows"), (25, 33, "rows"), (33, 42, "keys"), (42, 46, "keys"),
                          (46, 50, "keys")]:
        run, delta = solve.add(run, [k[lo:hi] for k in keys], values[lo:hi])
        total = [t + d for t, d in zip(total, delta)]
        assert run.rows == hi and (run.inverse is None) == (space == "rows")
    assert torch.equal(run.inverse, run.inverse.T)
    exact = solve.solve(solve.factorize(keys, lams, priors, mus), values)
    started = solve.start(keys, values, lams, priors, mus)
    assert started.inverse is not None and started.factor is None
    for a, b, c, want in zip(total, run.shifts, started.shifts, exact):
        assert all(torch.allclose(x, want, atol=1e-9) for x in (a, b, c))
    with pytest.raises(ValueError, match="keys must be 3 x d_k"):
        solve.add(run, [k[:3, :5] for k in keys], values[:3])


def test_memory_budget_refuses_a_solve_that_does_not_fit_before_allocating_it():
    """A solve whose row-space factor or key-space inverse does not fit the budget is refused
    before anything large is allocated, naming the size and the option; within it, the same
    S_l as without one. A model with p = 6 x 14,336 (Llama-3-8B's down_proj) is checked from
    its sizes alone."""
    keys, values, priors = coupled_problem(50)
    lams, mus = [0.7, 1.3, 0.4], [2.0, 0.5, 1.0]
    exact = solve.solve(solve.factorize(keys, lams, priors, mus), values)
    budget = solve.key_space_bytes([12] * 3)  # P fits, with nothing to spare
    run = solve.start([k[:30] for k in keys], values[:30], lams, priors, mus, budget=budget)
    run, _ = solve.add(run, [k[30:] for k in keys], values[30:], budget=budget)
    assert run.inverse is not None and run.rows == 50
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(run.shifts, exact))
    with pytest.raises(MemoryError, match=r"50 key rows over p = 36 .* in key space.*"
                                          r"solve_memory_gb"):
        solve.start(keys, values, lams, priors, mus, budget=budget - 1)
    run = solve.start([k[:30] for k in keys], values[:30], lams, priors, mus, budget=budget)
    with pytest.raises(MemoryError, match="in key space"):  # the switch, refused
        solve.add(run, [k[30:] for k in keys], values[30:], budget=budget - 1)
    with pytest.raises(MemoryError, match="in row space"):
        solve.start([k[:30] for k in keys], values[:30], lams, priors, mus,
                    budget=solve.row_space_bytes(30, [12] * 3) - 1)
    llama = [14_336] * 6  # nothing of this size is allocated: the sizes alone decide
    with pytest.raises(MemoryError, match=r"90000 key rows over p = 86016 key dimensions needs "
                                          r"165\.4 GiB in key space"):
        solve._in_key_space(90_000, llama, budget=64 * 2**30)
    assert not solve._in_key_space(2_000, llama, budget=64 * 2**30)  # 2.6 GiB in row space


def test_hundreds_of_batches_in_turn_do_not_drift():
    """300 batches of 3 rows over p = 24 (row space, the switch, then ~290 Woodbury updates
    of P in place) end within 1e-8 of one solve of all 900 rows."""
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(900, 12, generator=g, dtype=F64) for _ in range(2)]
    values = torch.randn(900, 4, generator=g, dtype=F64)
    lams = [0.5, 2.0]
    run = solve.start([k[:3] for k in keys], values[:3], lams)
    for lo in range(3, 900, 3):
        run, _ = solve.add(run, [k[lo:lo + 3] for k in keys], values[lo:lo + 3])
    exact = solve.solve(solve.factorize(keys, lams), values)
    drift = max(((a - b).norm() / b.norm()).item() for a, b in zip(run.shifts, exact))
    assert run.inverse is not None and drift < 1e-8


def test_hypernet_never_imports_chatedit():
    for path in Path(__file__).parents[1].joinpath("hypernet").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "chatedit" for n in names), path
