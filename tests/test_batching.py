"""Serving speed features that change how the network is called: concurrent requests sharing
network batches, and torch.compile warmed up before the first request. Real network (BiRefNet
lite with the parity fixture's weights), real photos, real threads."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import ASSETS
from PIL import Image

from rmbg_demo.engines.pytorch import compiled_batch_sizes
from rmbg_demo.pipeline import RemovalPipeline

PHOTOS = ["chelsea.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg"]
SIZE = (256, 256)


@pytest.fixture(scope="module")
def photos():
    return [Image.open(ASSETS / name).convert("RGB") for name in PHOTOS]


@pytest.fixture(scope="module")
def one_by_one(lite_fixture_model, photos):
    """Each photo's mask from a plain pipeline, one image per network call."""
    pipeline = RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                               input_size=SIZE)
    return [np.asarray(pipeline(photo).mask, dtype=int) for photo in photos]


def gated(batcher, waiting_for: int):
    """Hold the batcher's first batch until `waiting_for` images are queued behind it: the next
    batch's make-up is then known in advance. Returns the batch sizes seen and an event set
    once the first batch is running."""
    sizes, first = [], threading.Event()

    def hold(size):
        if not first.is_set():
            first.set()
            for _ in range(3000):
                if batcher.queued >= waiting_for:
                    break
                time.sleep(0.01)
        sizes.append(size)

    batcher.before_batch = hold
    return sizes, first


def first_alone_then_together(pool, work, items, started):
    """Submit the first item, and the rest only once its batch is running: on a slow machine
    two requests sent together could otherwise reach the queue before the worker takes one."""
    futures = [pool.submit(work, items[0])]
    assert started.wait(60), "the first request never reached the network"
    futures += [pool.submit(work, item) for item in items[1:]]
    return [future.result() for future in futures]


def test_concurrent_requests_share_a_network_batch_and_each_gets_its_own_mask(lite_fixture_model, photos,
                                                                              one_by_one):
    pipeline = RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                               input_size=SIZE, batch_requests=4)
    sizes, started = gated(pipeline.batcher, waiting_for=3)
    with ThreadPoolExecutor(max_workers=4) as pool:
        masks = first_alone_then_together(pool, lambda photo: np.asarray(pipeline(photo).mask, dtype=int),
                                          photos, started)
    assert sizes == [1, 3]  # the first alone (no waiting for company), the other three together
    assert pipeline.batcher.batches == 2 and pipeline.batcher.largest == 3
    for name, mask, alone in zip(PHOTOS, masks, one_by_one):
        assert mask.shape == alone.shape, name
        assert np.abs(mask - alone).max() <= 1, f"{name} got a mask that is not its own"
    assert all(m.std() > 4 for m in masks), "the fixture weights must give masks with structure to compare"


def test_requests_beyond_max_batch_wait_for_the_next_batch(lite_fixture_model, photos):
    pipeline = RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                               input_size=SIZE, batch_requests=2)
    sizes, started = gated(pipeline.batcher, waiting_for=3)
    with ThreadPoolExecutor(max_workers=4) as pool:
        first_alone_then_together(pool, pipeline, photos, started)
    assert sizes == [1, 2, 1]  # 1 first, then 3 queued: 2 (the cap) and the last one


def test_a_network_failure_reaches_its_callers_and_the_batcher_goes_on(lite_fixture_model, photos, one_by_one):
    pipeline = RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                               input_size=SIZE, batch_requests=4)
    with pytest.raises(RuntimeError, match="channels"):
        pipeline.batcher(torch.zeros(1, 5, *SIZE))  # five colour channels: the first convolution refuses
    assert np.abs(np.asarray(pipeline(photos[0]).mask, dtype=int) - one_by_one[0]).max() <= 1


def test_a_failing_shared_batch_fails_every_caller_in_it_and_the_batcher_goes_on(lite_fixture_model, photos,
                                                                                 one_by_one):
    pipeline = RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                               input_size=SIZE, batch_requests=4)
    sizes, started = gated(pipeline.batcher, waiting_for=3)
    broken = torch.zeros(1, 5, *SIZE)  # five colour channels: the first convolution refuses

    answers = {}

    def call(index, batch):
        try:
            answers[index] = pipeline.batcher(batch)
        except RuntimeError as exc:
            answers[index] = exc

    # Daemon threads: a caller left waiting for ever must fail this test, not hang the run.
    callers = [threading.Thread(target=call, args=(0, pipeline.preprocess(photos[0])), daemon=True)]
    callers[0].start()
    assert started.wait(60), "the first request never reached the network"
    callers += [threading.Thread(target=call, args=(i, broken), daemon=True) for i in (1, 2, 3)]
    for caller in callers[1:]:
        caller.start()
    deadline = time.monotonic() + 300
    for caller in callers:
        caller.join(timeout=max(0.0, deadline - time.monotonic()))
    assert sorted(answers) == [0, 1, 2, 3], f"callers left without an answer: {answers}"
    answers = [answers[i] for i in range(4)]
    assert sizes == [1, 3]  # the three broken inputs shared one batch
    assert isinstance(answers[0], torch.Tensor) and answers[0].shape == (1, 1, *SIZE)
    assert all(isinstance(answer, RuntimeError) and "channels" in str(answer) for answer in answers[1:]), answers
    assert np.abs(np.asarray(pipeline(photos[1]).mask, dtype=int) - one_by_one[1]).max() <= 1


def test_compiled_batch_sizes_cover_every_batch_up_to_the_largest():
    assert compiled_batch_sizes(1) == (1,)
    assert compiled_batch_sizes(8) == (1, 2, 4, 8)
    assert compiled_batch_sizes(6) == (1, 2, 4, 6)


def test_compiled_network_is_warmed_up_at_start_and_never_recompiles_for_a_request(lite_fixture_model, photos,
                                                                                    one_by_one):
    # The "eager" backend runs dynamo's capture (what decides recompiles) without inductor's
    # C++ code generation, which takes minutes per graph on a 2-core CPU. A batch of 3 is
    # zero-padded to 4, a size compiled at start: without the padding it would recompile.
    torch._dynamo.reset()
    try:
        pipeline = RemovalPipeline("birefnet-lite", network=lite_fixture_model, device="cpu", dtype="float32",
                                   input_size=SIZE, batch_size=4, compile="eager")
        assert pipeline.engine.compiled_batch_sizes == (1, 2, 4)
        assert "compiled" in pipeline.describe()
        with torch.compiler.set_stance("fail_on_recompile"):
            single = np.asarray(pipeline(photos[3]).mask, dtype=int)
            padded = [np.asarray(r.mask, dtype=int) for r in pipeline.process(photos[:3])]  # one batch of 3
    finally:
        torch._dynamo.reset()
    for mask, alone in zip([single, *padded], [one_by_one[3], *one_by_one[:3]]):
        assert np.abs(mask - alone).max() <= 1


def test_compile_refuses_a_model_torch_cannot_compile():
    with pytest.raises(ValueError, match="onnx"):
        RemovalPipeline("u2netp", device="cpu", compile="inductor")
