"""The host-side coefficient helpers the solvers share: phi functions of any order,
exponential-integrator moments and interpolation (Lagrange) weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpmsolver.solvers import exponential_moments, lagrange_weights, phi_functions, phi_sequence

H_VALUES = [-3.0, -0.5, -0.09, -1e-5, 1e-9, 1e-4, 0.05, 0.0999, 0.1, 0.3, 1.0, 4.0]


@pytest.mark.parametrize("h", H_VALUES)
def test_exponential_moments_are_the_integrals(h: float) -> None:
    """mu_i = h Int_0^1 e^(-h (1 - tau)) tau^i dtau, by 40-point Gauss-Legendre quadrature
    (exact to rounding for these smooth integrands), on both sides of the series switch."""
    nodes, weights = np.polynomial.legendre.leggauss(40)
    tau = 0.5 * (nodes + 1.0)
    for i, mu in enumerate(exponential_moments(h, 5)):
        ref = float(h * 0.5 * np.sum(weights * np.exp(-h * (1.0 - tau)) * tau**i))
        assert mu == pytest.approx(ref, rel=1e-12, abs=1e-300), (i, mu, ref)


def test_phi_sequence_extends_phi_functions() -> None:
    for h in [*H_VALUES, math.inf]:
        assert phi_sequence(h, 3) == phi_functions(h)
        p = phi_sequence(h, 5)
        if math.isfinite(h) and abs(h) >= 0.1:
            # the defining recursion phi_{k+1} = phi_k/h - (-1)^k/k!
            for k in range(1, 5):
                assert p[k] == pytest.approx(
                    p[k - 1] / h - (-1) ** k / math.factorial(k), rel=1e-12
                )
    assert phi_sequence(math.inf, 4) == (-1.0, 1.0, -0.5, 1.0 / 6.0)


def test_lagrange_weights_integrate_polynomials_exactly() -> None:
    rng = np.random.default_rng(0)
    for n in range(1, 6):
        nodes = list(-np.cumsum(rng.uniform(0.3, 1.5, n)) + rng.uniform(0.5, 1.0))
        coeffs = rng.normal(size=n)  # a polynomial of degree n - 1
        values = [float(np.polyval(coeffs[::-1], x)) for x in nodes]
        moments = [1.0 / (i + 1) for i in range(n)]  # Int_0^1 tau^i dtau
        w = lagrange_weights(nodes, moments)
        assert sum(wj * v for wj, v in zip(w, values, strict=True)) == pytest.approx(
            float(np.dot(coeffs, moments)), rel=1e-10
        )
    with pytest.raises(ValueError, match="distinct"):
        lagrange_weights([0.0, -1.0, -1.0], [1.0, 0.5, 1 / 3])
