"""The Triton scan kernels against the float64 reference, run on CPU by Triton's interpreter.

Triton's interpreter has to be chosen before triton is first imported (and importing torch's
FLOP counter, as matten.ssm does, imports it), so the kernels run in a worker process started with
``TRITON_INTERPRET=1``; the float64 reference runs here. Shapes are tiny: the interpreter runs
every program and every tile operation in Python.
"""

import multiprocessing
import os
import sys

import pytest
import torch
from test_ssm import LAYOUTS, make_inputs, rel_err

from matten.models import create_model
from matten.ssm import backend, selective_scan
from matten.ssm.reference import selective_scan_ref

if sys.platform != "linux":  # triton has Linux wheels only (the test extra installs it there)
    pytest.importorskip("triton")


@pytest.fixture(scope="module")
def worker():
    """A process in which Triton interprets its kernels on CPU tensors."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # inherited by the process started here
    try:
        pool = multiprocessing.get_context("spawn").Pool(1)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    with pool:
        assert pool.apply(_interpreted)
        yield pool


def _interpreted():
    from matten.ssm import triton_scan

    return triton_scan.INTERPRETED and backend("cpu", override="triton") == "triton"


def triton(chunk):
    def scan(
        u,
        delta,
        A,
        B,
        C,
        D=None,
        z=None,
        delta_bias=None,
        delta_softplus=False,
        return_last_state=False,
        initial_state=None,
    ):
        from matten.ssm import triton_scan

        y, last = triton_scan.selective_scan_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk=chunk
        )
        return (y, last) if return_last_state else y

    return scan


def _triton_outputs_and_grads(x, h0, chunk, kwargs):
    """In the worker: outputs and gradients of the Triton scan, detached for the trip back."""
    got = outputs_and_grads(triton(chunk), x, h0, **kwargs)
    return {k: None if v is None else v.detach() for k, v in got.items()}


def run_triton(worker, x, h0=None, chunk=8, **kwargs):
    return worker.apply(_triton_outputs_and_grads, (x, h0, chunk, kwargs))


def outputs_and_grads(scan, x, h0=None, on=("y", "last"), seed=1, **kwargs):
    """y, the last state and the gradient of every input of a random weighting of ``on``."""
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    if h0 is not None:
        leaves["initial_state"] = h0.clone().requires_grad_()
    y, last = scan(**leaves, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
        for name, out in (("y", y), ("last", last))
        if name in on
    )
    loss.backward()
    return {"y": y, "last": last, **{k: v.grad for k, v in leaves.items()}}


def check(got, ref, tol, dtype=torch.float32):
    for key, value in ref.items():
        assert got[key] is not None, key
        assert got[key].shape == value.shape, key
        if key != "last":
            assert got[key].dtype == dtype, key
        assert rel_err(got[key], value) < tol, (key, rel_err(got[key], value))


def reference(x, h0=None, **kwargs):
    x64 = {k: v.double() for k, v in x.items()}
    return outputs_and_grads(selective_scan_ref, x64, None if h0 is None else h0.double(), **kwargs)


@pytest.mark.parametrize("layout_b,layout_c", LAYOUTS)
def test_every_layout_and_feature_matches_reference(worker, layout_b, layout_c):
    # 21 steps in chunks of 8: two full chunks and a partial one; 2 channels per group.
    x = make_inputs(2, 4, 21, 3, B=layout_b, C=layout_c)
    h0 = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    got = run_triton(worker, x, h0, delta_softplus=True)
    check(got, reference(x, h0, delta_softplus=True), 1e-5)


@pytest.mark.parametrize("length", [1, 8, 16, 37])
def test_lengths_around_the_chunk_size(worker, length):
    x = make_inputs(1, 2, length, 4, seed=length)
    h0 = torch.randn(1, 2, 4)
    got = run_triton(worker, x, h0, delta_softplus=True)
    check(got, reference(x, h0, delta_softplus=True), 1e-5)


@pytest.mark.parametrize("shift", [-14.0, 18.0])
def test_softplus_in_both_tails(worker, shift):
    # softplus(-14) = 8e-7: a plain log(1 + exp(x)) in float32 would be off by percents.
    x = make_inputs(1, 2, 9, 4)
    x["delta"] = x["delta"] * 4 + shift
    got = run_triton(worker, x, delta_softplus=True)
    check(got, reference(x, delta_softplus=True), 1e-5)


def test_without_optional_inputs(worker):
    x = make_inputs(2, 2, 19, 4, B="grouped")
    x = {k: x[k] for k in ["u", "delta", "A", "B", "C"]}
    x["delta"] = x["delta"].abs()  # no softplus: keep the steps positive
    got = run_triton(worker, x, on=("y",))
    check(got, reference(x, on=("y",)), 1e-5)


def test_gradient_through_the_last_state_alone(worker):
    x = make_inputs(1, 2, 13, 4, C="constant")
    h0 = torch.randn(1, 2, 4)
    got = run_triton(worker, x, h0, chunk=4, on=("last",), delta_softplus=True)
    expected = reference(x, h0, on=("last",), delta_softplus=True)
    for name in ["C", "D", "z"]:  # the output side does not reach the state
        assert expected.pop(name) is None and got.pop(name).abs().max() == 0
    check(got, expected, 1e-5)


def test_float64_inputs_are_computed_in_float64(worker):
    x = make_inputs(1, 4, 13, 3, dtype=torch.float64, B="constant", C="grouped")
    h0 = torch.randn(1, 4, 3, dtype=torch.float64)
    got = run_triton(worker, x, h0, chunk=4, delta_softplus=True)
    check(got, reference(x, h0, delta_softplus=True), 1e-12, dtype=torch.float64)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1.5e-3)])
def test_half_precision_inputs_accumulate_in_float32(worker, dtype, tol):
    x = make_inputs(1, 2, 20, 4, dtype=dtype)
    h0 = torch.randn(1, 2, 4, dtype=dtype)
    got = run_triton(worker, x, h0, delta_softplus=True)
    # The reference sees the same rounded inputs: what is left is the kernel's own rounding,
    # which float32 arithmetic keeps to that of storing the results in the input dtype.
    check(got, reference(x, h0, delta_softplus=True), tol, dtype=dtype)


def _through_selective_scan(x):
    """In the worker: selective_scan on the Triton backend, chosen by argument and by variable."""
    expected = selective_scan_ref(**x, delta_softplus=True).float()
    by_argument = selective_scan(**x, delta_softplus=True, backend="triton")
    os.environ["MATTEN_SCAN_BACKEND"] = "triton"
    try:
        chosen = backend("cpu")
        with torch.no_grad():  # no chunk states kept without a backward to follow
            y, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    finally:
        del os.environ["MATTEN_SCAN_BACKEND"]
    try:
        triton(12)(**x)
        chunk_error = None
    except ValueError as e:
        chunk_error = str(e)
    return (chosen, rel_err(by_argument, expected), rel_err(y, expected), last.dtype, chunk_error)


def test_selective_scan_dispatches_to_triton_when_asked(worker):
    x = make_inputs(2, 2, 11, 4, B="grouped", C="constant")
    chosen, err_argument, err_variable, last_dtype, chunk_error = worker.apply(
        _through_selective_scan, (x,)
    )
    assert chosen == "triton" and err_argument < 1e-5 and err_variable < 1e-5
    assert last_dtype == torch.float32
    assert "power of two" in chunk_error


def tiny_model_after_training(name, steps=2):
    """A one-block Matten (one bidirectional global Mamba layer) after a few SGD steps with the
    scan backend ``name``."""
    os.environ["MATTEN_SCAN_BACKEND"] = name
    try:
        assert backend("cpu") == name
        torch.manual_seed(0)
        model = create_model(
            "Matten-S/2",
            variant=1,
            depth=1,
            hidden_size=8,
            num_heads=1,
            d_state=4,
            expand=1,
            in_channels=4,
        )
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # away from the zero-initialised identity, so every weight trains
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        x, target = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 8, 2, 4, 4, generator=g)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(steps):
            loss = (model(x, torch.tensor([500])) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        del os.environ["MATTEN_SCAN_BACKEND"]
    return losses, start, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_tiny_matten_trains_the_same_with_every_backend(worker):
    interpreted = worker.apply_async(tiny_model_after_training, ("triton",))
    results = {name: tiny_model_after_training(name) for name in ["cpu", "chunked"]}
    results["triton"] = interpreted.get()
    losses, start, weights = results["cpu"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    scan_weights = [n for n in weights if "ssms" in n]
    assert scan_weights and all(not torch.equal(weights[n], start[n]) for n in scan_weights)
    for name in ["triton", "chunked"]:
        other_losses, _, other = results[name]
        assert other_losses == pytest.approx(losses, rel=1e-5), name
        for n in weights:
            assert torch.allclose(other[n], weights[n], rtol=1e-4, atol=1e-6), (name, n)


def _triton_conv_grads(x, weight, grad, left, start):
    """In the worker: the Triton kernel's gradients of the depthwise conv."""
    from matten.ssm import triton_conv

    assert triton_conv.INTERPRETED
    return triton_conv.conv_backward(x, weight, grad, left, start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "length, padding, crop",
    [(37, (3, 3), (0, 37)), (37, (3, 3), (3, None)), (5, (3, 0), (0, None)), (20, (1, 5), (2, -1))],
)
def test_triton_conv_backward_equals_torch_conv_gradients(worker, dtype, length, padding, crop):
    """The depthwise conv's Triton backward (the CUDA path of depthwise_conv1d) gives torch's
    conv1d gradients of the input, weight and bias: the causal and the reversed crop of the
    Mamba layer, a row shorter than the block, a strided input, and other geometries."""
    from matten.ssm.depthwise_conv import depthwise_conv1d

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, length, dtype=dtype, generator=g)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as in_proj's output once was
    w = torch.randn(6, 1, 4, dtype=dtype, generator=g)
    b = torch.randn(6, dtype=dtype, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = torch.nn.functional.conv1d(
        torch.nn.functional.pad(leaves[0], padding), *leaves[1:], groups=6
    )
    out = out[..., slice(*crop)]
    grad = torch.randn(out.shape, dtype=dtype, generator=g)
    out.backward(grad)
    ours = depthwise_conv1d(x, w, b, padding=padding, crop=crop)  # its crop, as the kernel gets it
    assert ours.shape == out.shape
    start = range(length + sum(padding) - 3)[slice(*crop)].start
    got = worker.apply(_triton_conv_grads, (x, w, grad, padding[0], start))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for mine, leaf in zip(got, leaves, strict=True):
        assert mine.dtype == dtype
        torch.testing.assert_close(mine, leaf.grad, **tol)
