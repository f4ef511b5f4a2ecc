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
        grad_values, grad_log_lam, no_mu = solve_backward(factor, shift, weight)
        assert torch.allclose(grad_values, v.grad, atol=1e-10), form
        assert torch.allclose(grad_log_lam, ll.grad, atol=1e-10), form
        assert no_mu is None


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
    grad_values, grad_log_lam, _ = solve_backward(factor, solve(factor, values), weight)
    bump = torch.zeros_like(values)
    bump[3, 2] = eps
    fd = (loss(values + bump, log_lam) - loss(values - bump, log_lam)) / (2 * eps)
    assert torch.allclose(fd, grad_values[3, 2], atol=1e-7)
    fd = (loss(values, log_lam + eps) - loss(values, log_lam - eps)) / (2 * eps)
    assert torch.allclose(fd, grad_log_lam, atol=1e-7)


def unrelated_keys(d_k=12, seed=1):
    """40 keys of unrelated text and their second moment C (a key prior)."""
    x = torch.randn(40, d_k, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x, x.T @ x / 40


def test_key_prior_solve_and_backward():
    """A = K^T K + lam I + mu C: the solve matches the normal equations, the analytic backward
    (values, log lam, log mu) matches autograd, and the Function passes gradcheck."""
    keys, values, weight = problem(4)  # n < d_k: the prior still forces the d_k x d_k form
    _, prior = unrelated_keys()
    v = values.clone().requires_grad_()
    ll = torch.tensor(-0.3, dtype=F64, requires_grad=True)
    lm = torch.tensor(0.5, dtype=F64, requires_grad=True)
    expected = torch.linalg.solve(keys.T @ keys + ll.exp() * torch.eye(12, dtype=F64)
                                  + lm.exp() * prior, keys.T @ v)
    (expected * weight).sum().backward()
    factor = factorize(keys, ll.exp().detach(), F64, prior=prior, mu=lm.exp().detach())
    assert not factor.small
    shift = solve(factor, values)
    assert torch.allclose(shift, expected.detach(), atol=1e-10)
    grads = solve_backward(factor, shift, weight)
    for analytic, auto in zip(grads, (v.grad, ll.grad, lm.grad)):
        assert torch.allclose(analytic, auto, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda v, a, b: least_squares(keys, v, a, F64, prior=prior, log_mu=b),
        (values.clone().requires_grad_(), ll.detach().clone().requires_grad_(),
         lm.detach().clone().requires_grad_()))
    with pytest.raises(ValueError, match="d_k x d_k form"):
        factorize(keys, 1.0, F64, "tokens", prior=prior, mu=1.0)
    with pytest.raises(ValueError, match="key prior must be"):
        factorize(keys, 1.0, F64, prior=prior[:5, :5], mu=1.0)


def test_key_prior_keeps_outputs_on_its_keys():
    """The larger mu, the less the shift moves outputs on the prior's keys (and the
    network's log mu gets a gradient); a MEND network cannot hold a prior."""
    keys, grads, _ = problem(30)
    loc, prior = unrelated_keys()
    moved = []
    for log_mu in (-5.0, 0.0, 5.0):
        net = HyperNetwork({"a": (12, 5)}, rank=4, lr=0.1, prior=True, log_mu=log_mu).double()
        net.set_prior("a", prior)
        shift = net.shift("a", keys, grads, F64)
        moved.append((loc @ shift).norm().item())
        shift.sum().backward()
        assert net.net("a").log_mu.grad.abs().sum() > 0
    assert moved[0] > moved[1] > moved[2]
    assert net.has_prior and not HyperNetwork({"a": (12, 5)}).has_prior
    with pytest.raises(ValueError, match="must be 12 x 12"):
        net.set_prior("a", torch.eye(5))
    with pytest.raises(ValueError, match="needs the least-squares solve"):
        HyperNetwork({"a": (12, 5)}, rule="mend", prior=True)
    with pytest.raises(ValueError, match="no key prior"):
        HyperNetwork({"a": (12, 5)}).set_prior("a", torch.eye(12))


def test_float32_solve_is_close_to_float64():
    keys, values, _ = problem(50, d_k=64, d_v=16)
    lam = torch.tensor(1e-2)
    exact = solve(factorize(keys, lam, F64), values)
    approx = solve(factorize(keys.float(), lam, torch.float32), values.float())
    assert torch.allclose(approx.double(), exact, rtol=1e-3, atol=1e-3)


def test_bad_keys_raise():
    keys, _, _ = problem(5)
    keys[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        factorize(keys, torch.tensor(1.0, dtype=F64), F64)
    with pytest.raises(ValueError, match="n x d_k"):
        factorize(torch.zeros(3), torch.tensor(1.0))


def test_float32_cholesky_failure_is_solved_in_float64():
    """Many more rows than rank against a small lambda: B = I + K R^-1 K^T (and K K^T + lam I)
    is positive definite but too ill-conditioned for float32's Cholesky (as an untrained
    coupled editor's at N = 4096 was on a GPU). The solves warn and are done in float64; the
    diagnostics, which measure float32 itself, report an infinite difference."""
    from hypernet.solve import (coupled_diagnostics, coupled_extend, coupled_factorize,
                                coupled_solve)

    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(400, 16, generator=g) * 30 for _ in range(2)]
    values, lams = torch.randn(400, 8, generator=g), [1e-3, 1e-3]
    with pytest.raises(FloatingPointError, match="not positive definite in torch.float32"):
        coupled_factorize(keys, lams, torch.float32, fallback=False)
    with pytest.warns(UserWarning, match="solved in float64"):
        factor = coupled_factorize(keys, lams, torch.float32)
    assert factor.chol_b.dtype == F64
    exact = coupled_solve(coupled_factorize([k.double() for k in keys], lams, F64), values)
    for got, want in zip(coupled_solve(factor, values), exact):
        assert torch.allclose(got, want)
    assert coupled_diagnostics(keys, values, lams)["fp32_vs_fp64"] == float("inf")
    few = coupled_factorize([k[:8] for k in keys], lams, torch.float32, fallback=False)
    with pytest.warns(UserWarning, match="solved in float64"):  # the extension fails too
        grown = coupled_extend(few, [k[8:] for k in keys])
    for got, want in zip(coupled_solve(grown, values), exact):
        assert torch.allclose(got, want)
    lam = torch.tensor(1e-3)
    with pytest.warns(UserWarning, match="solved in float64"):
        one = factorize(keys[0], lam, torch.float32, form="tokens")
    assert torch.allclose(solve(one, values), solve(factorize(keys[0].double(), lam, F64,
                                                              form="tokens"), values))


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


def trained_like(net):
    """Perturb an untrained network's zero-initialised parts so every parameter matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.mark.parametrize("rule,prior,reg_rows", [("malmen", False, None), ("malmen", True, 7),
                                                 ("mend", False, None)])
def test_chunked_shift_and_backward_equal_one_graph(rule, prior, reg_rows):
    """shift(chunk=c) and backward(chunk=c) (bounded memory) equal the unchunked shift and
    autograd through it, for MALMEN (with and without a key prior and row-scaled lambda)
    and MEND."""
    keys, grads, weight = problem(30)
    kw = {"prior": True, "log_mu": 0.5} if prior else {}
    net = trained_like(HyperNetwork({"a": (12, 5)}, rule=rule, rank=4, lr=0.1,
                                    reg_rows=reg_rows, **kw).double())
    if prior:
        net.set_prior("a", unrelated_keys()[1])
    whole = net.shift("a", keys, grads, F64)
    (whole * weight).sum().backward()
    expected = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=False)
    with torch.no_grad():
        assert torch.allclose(net.shift("a", keys, grads, F64, chunk=7), whole, atol=1e-10)
    net.backward("a", keys, grads, weight, F64, chunk=7)
    for n, p in net.named_parameters():
        got = torch.zeros_like(p) if p.grad is None else p.grad
        assert torch.allclose(got, expected[n], atol=1e-9), n
    assert expected["nets.12x5.blocks.0.down"].abs().sum() > 0
    assert any(g.abs().sum() > 0 for n, g in expected.items() if "log_lam" in n) == (
        rule == "malmen")


def test_row_scaled_lambda_keeps_its_weight_against_the_keys():
    """With reg_rows, duplicating every row (K^T K doubles) doubles lambda too: the shift of
    the same facts repeated twice equals the shift of one copy."""
    keys, grads, _ = problem(30)
    for reg_rows, same in ((10, True), (None, False)):
        net = trained_like(HyperNetwork({"a": (12, 5)}, rank=4, lr=0.1, log_lam=1.0,
                                        reg_rows=reg_rows).double())
        with torch.no_grad():
            once = net.shift("a", keys, grads, F64)
            twice = net.shift("a", keys.repeat(2, 1), grads.repeat(2, 1), F64)
        assert torch.allclose(once, twice, atol=1e-10) == same


def test_solve_diagnostics():
    """Few rows are fitted exactly (residual ~0, leverage ~1 with a tiny lambda); many rows
    leave a residual; a large lambda shrinks the leverage; float32 is close to float64."""
    from hypernet import diagnostics

    few, many = problem(6), problem(60)
    exact = diagnostics(few[0], few[1], torch.tensor(1e-8))
    assert exact["residual"] < 1e-6 and exact["leverage"] == pytest.approx(1.0, abs=1e-6)
    over = diagnostics(many[0], many[1], torch.tensor(1e-8))
    assert over["residual"] > 0.3 and over["leverage"] == pytest.approx(12 / 60, rel=1e-4)
    ridge = diagnostics(many[0], many[1], torch.tensor(1e3))
    assert ridge["leverage"] < 0.1 * over["leverage"] and ridge["residual"] > over["residual"]
    assert exact["fp32_vs_fp64"] < 1e-3
    net = HyperNetwork({"a": (12, 5)}, rank=4, lr=0.1, prior=True).double()
    net.set_prior("a", unrelated_keys()[1])
    assert set(net.diagnose("a", many[0], many[1], chunk=7)) == set(exact)
    # two modules sharing one solve fit 60 rows that each alone (d_k = 12) cannot
    pair = HyperNetwork({"a": (12, 5), "b": (12, 5)}, rank=4, lr=0.1, log_lam=-8.0).double()
    captured = {"a": many[:2], "b": (problem(61)[0][:60], many[1])}
    alone = pair.diagnose_all(captured)
    pair.couple = True
    (coupled,) = pair.diagnose_all(captured)
    assert [r["modules"] for r in alone] == [["a"], ["b"]] and coupled["modules"] == ["a", "b"]
    assert coupled["leverage"] > 1.5 * max(r["leverage"] for r in alone)
    assert coupled["residual"] < min(r["residual"] for r in alone)


def coupled_problem(n, layers=3, d_k=12, d_v=5):
    g = torch.Generator().manual_seed(100 + n)
    keys = [torch.randn(n, d_k, generator=g, dtype=F64) for _ in range(layers)]
    priors = [unrelated_keys(seed=10 + i)[1] for i in range(layers)]
    return keys, torch.randn(n, d_v, generator=g, dtype=F64), priors


@pytest.mark.parametrize("n", [20, 50])  # fewer and more rows than one module's d_k
def test_coupled_solve_is_the_ridge_solve_over_concatenated_keys(n):
    """The coupled solve equals min ||[K_1..K_L] [S_1; ..; S_L] - D||^2 + sum tr(S^T R S)
    from the normal equations; its backward (D, log lam, log mu) matches autograd through
    them; one module gives the per-module ridge solve; the coupled fit leaves a smaller
    residual than any module alone when n > d_k."""
    from hypernet.solve import coupled_backward, coupled_factorize, coupled_solve

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
    factor = coupled_factorize(keys, log_lam.detach().exp(), F64, priors, log_mu.detach().exp())
    shifts = coupled_solve(factor, values)
    assert torch.allclose(torch.cat(shifts), expected, atol=1e-10)
    g, d_lam, d_mu = coupled_backward(factor, shifts, weights.split(12))
    assert torch.allclose(g, d.grad, atol=1e-10)
    assert torch.allclose(torch.stack(d_lam), log_lam.grad, atol=1e-10)
    assert torch.allclose(torch.stack(d_mu), log_mu.grad, atol=1e-10)
    one = coupled_solve(coupled_factorize(keys[:1], [0.7], F64, priors[:1], [2.0]), values)[0]
    assert torch.allclose(one, solve(factorize(keys[0], 0.7, F64, prior=priors[0], mu=2.0),
                                      values), atol=1e-10)
    small = [1e-6] * 3
    fit = sum(kk @ s for kk, s in zip(keys, coupled_solve(
        coupled_factorize(keys, small, F64), values)))
    alone = [kk @ solve(factorize(kk, 1e-6, F64), values) for kk in keys]
    residual = [(f - values).norm() / values.norm() for f in [fit, *alone]]
    assert (residual[0] < 1e-4) == (n < 36) and all(r > residual[0] for r in residual[1:])
    if n > 12:
        assert min(residual[1:]) > 0.3


def test_coupled_factor_extended_by_rows_equals_the_factor_of_all_rows():
    """Rows added in turn (`coupled_extend`, twice) give the factor and the solve of all the
    rows factorized at once; keys of another width are refused."""
    from hypernet.solve import coupled_extend, coupled_factorize, coupled_solve

    keys, values, priors = coupled_problem(50)
    lams, mus = [0.7, 1.3, 0.4], [2.0, 0.5, 1.0]
    factor = coupled_factorize([k[:20] for k in keys], lams, F64, priors, mus)
    factor = coupled_extend(coupled_extend(factor, [k[20:35] for k in keys]),
                            [k[35:] for k in keys])
    full = coupled_factorize(keys, lams, F64, priors, mus)
    assert torch.allclose(factor.chol_b, full.chol_b, atol=1e-10)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(factor.proj, full.proj))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(
        coupled_solve(factor, values), coupled_solve(full, values)))
    with pytest.raises(ValueError, match="keys must be m x d_k"):
        coupled_extend(factor, [k[:3, :5] for k in keys])


def test_coupled_rows_added_in_turn_equal_one_solve_in_row_and_key_space():
    """Batches of rows added in turn (`coupled_add`: recursive least squares) give the S_l of
    one solve of all the rows: in row space while the rows number at most p = sum_l d_k
    (36 here), then once more with P = (K^T K + R)^-1 of all rows, then by Woodbury updates
    of P; `coupled_start` of more than p rows starts in key space. Keys of another width are
    refused."""
    from hypernet.solve import coupled_add, coupled_factorize, coupled_solve, coupled_start

    keys, values, priors = coupled_problem(50)
    lams, mus = [0.7, 1.3, 0.4], [2.0, 0.5, 1.0]
    run = coupled_start([k[:10] for k in keys], values[:10], lams, F64, priors, mus)
    total = list(run.shifts)
    for lo, hi, space in [(10, 25, "rows"), (25, 33, "rows"), (33, 42, "keys"), (42, 46, "keys"),
                              (46, 50, "keys")]:
        run, delta = coupled_add(run, [k[lo:hi] for k in keys], values[lo:hi])
        total = [t + d for t, d in zip(total, delta)]
        assert run.rows == hi and (run.inverse is None) == (space == "rows")
    exact = coupled_solve(coupled_factorize(keys, lams, F64, priors, mus), values)
    started = coupled_start(keys, values, lams, F64, priors, mus)
    assert started.inverse is not None and started.factor is None
    for a, b, c, want in zip(total, run.shifts, started.shifts, exact):
        assert all(torch.allclose(x, want, atol=1e-9) for x in (a, b, c))
    with pytest.raises(ValueError, match="keys must be 3 x d_k"):
        coupled_add(run, [k[:3, :5] for k in keys], values[:3])


@pytest.mark.parametrize("prior", [False, True])
def test_coupled_shifts_and_backward_equal_autograd(prior):
    """HyperNetwork(couple=True): shifts() of two same-shape modules (and a third of another
    shape, solved alone) and backward_all(chunk=c) equal autograd through the normal
    equations of the concatenated keys, with D = D_1 + D_2."""
    kw = {"prior": True, "log_mu": 0.5} if prior else {}
    shapes = {"a": (12, 5), "b": (12, 5), "c": (8, 5)}
    net = trained_like(HyperNetwork(shapes, rank=4, lr=0.1, couple=True, reg_rows=9,
                                    **kw).double())
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
    e = net.net("a")  # autograd reference for the coupled pair
    d = sum(e.values(*captured[name], net.index[name]) for name in "ab")
    ridges = []
    for name in "ab":
        log_lam, log_mu = e.log_weights(net.index[name], n)
        r = log_lam.exp() * torch.eye(12, dtype=F64)
        ridges.append(r if log_mu is None else r + log_mu.exp() * e.prior[net.index[name]])
    k = torch.cat([captured["a"][0], captured["b"][0]], 1)
    pair = torch.linalg.solve(k.T @ k + torch.block_diag(*ridges), k.T @ d)
    alone = net.shift("c", *captured["c"], F64)
    loss = (pair * torch.cat([weights["a"], weights["b"]])).sum() + (alone * weights["c"]).sum()
    loss.backward()
    expected = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for name, p in net.named_parameters()}
    net.zero_grad(set_to_none=False)
    caches = {name: {} for name in shapes}
    shifts = net.shifts(captured, F64, chunk=7, caches=caches)
    assert torch.allclose(torch.cat([shifts["a"], shifts["b"]]), pair, atol=1e-10)
    assert torch.allclose(shifts["c"], alone, atol=1e-10)
    net.backward_all(captured, weights, F64, chunk=7, caches=caches)
    for name, p in net.named_parameters():
        got = torch.zeros_like(p) if p.grad is None else p.grad
        assert torch.allclose(got, expected[name], atol=1e-9), name
    assert expected["nets.12x5.log_lam"].abs().sum() > 0
    with pytest.raises(ValueError, match="coupling modules needs the least-squares"):
        HyperNetwork(shapes, rule="mend", couple=True)


def test_hypernet_never_imports_editor():
    for path in Path(__file__).parents[1].joinpath("hypernet").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "editor" for n in names), path
