"""A batch that runs out of CUDA memory is halved down to single questions: the real CUDA
allocator's error (torch.OutOfMemoryError), each call asking for (its questions - 1) times the
GPU's whole memory, so any batch of two or more fails and a single question allocates nothing."""

import torch

from pipeline.stages.question_isolation import answer_halving_on_oom


def test_cuda_out_of_memory_halves_the_batch():
    whole = torch.cuda.get_device_properties(0).total_memory

    def answer(batch):
        block = torch.empty((len(batch) - 1) * whole, dtype=torch.uint8, device="cuda")
        del block
        return [q * 10 for q in batch]

    results, failed = answer_halving_on_oom(answer, [0, 1, 2, 3])
    assert results == {0: 0, 1: 10, 2: 20, 3: 30} and failed == {}
    # the failed batches' memory went back: a tensor of half the GPU still fits
    half = torch.empty(whole // 2, dtype=torch.uint8, device="cuda")
    del half
