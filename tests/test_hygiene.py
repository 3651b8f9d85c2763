"""The test suite's own isolation: what one test changes in process-wide state does not reach the next."""

import random

import numpy as np
import torch

from conftest import SESSION_THREADS, preserved_global_state


def test_one_thread_fixture_sets_one_thread(one_thread):
    assert torch.get_num_threads() == 1


def test_the_next_test_starts_with_the_session_thread_count_again():
    assert torch.get_num_threads() == SESSION_THREADS   # the test above ran with one thread


def test_preserved_global_state_restores_threads_and_random_generators():
    draws = lambda: (torch.rand(3).tolist(), random.random(), np.random.rand())  # noqa: E731
    threads = torch.get_num_threads()
    with preserved_global_state():
        expected = draws()
    with preserved_global_state():
        torch.set_num_threads(threads + 1)
        torch.manual_seed(123), random.seed(123), np.random.seed(123)   # what sft.main / clgrpo.main do
        draws()
    assert torch.get_num_threads() == threads
    assert draws() == expected   # the generators are where they were before both blocks
