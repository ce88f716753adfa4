"""The training data: tokenised conversations as sequences (packed or not), batched, and which process sees which.

`Plan` is a pure function of (seed, epoch, step), so a resumed run finds its data position from
its step alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vicunaflow.finetune.config import Runtime, TrainConfig

log = logging.getLogger(__name__)


class TrainingData:
    """Training sequences: tokenised conversations, one per sequence or packed several per sequence."""

    def __init__(self, config: TrainConfig, runtime: Runtime) -> None:
        from vicunaflow import data as conversations

        self.config = config
        self.max_length = config.model_max_length
        self.tokenizer = conversations.load_tokenizer(Path(config.model_path))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        conversations.check_room_for_replies(self.tokenizer, self.max_length)  # else every step trains on nothing
        path = Path(config.data)
        self.conversations = None
        if path.is_dir():
            samples, meta = conversations.load_tokenized(path)
            if meta["model_max_length"] < self.max_length:
                log.warning(
                    "%s was tokenised with model_max_length %d < %d: its samples stay that short",
                    path, meta["model_max_length"], self.max_length,
                )  # fmt: skip
            if meta["model_max_length"] > self.max_length:
                samples = [
                    conversations.Sample(s.id, s.input_ids[: self.max_length], s.labels[: self.max_length])
                    for s in samples
                ]
            conversations.check_tokenizer_of(path, meta, config.model_path)
            self.samples = samples
        elif config.lazy_preprocess and not config.packing:
            self.conversations = conversations.load_conversations(path)  # validates every record now
            self.samples = [None] * len(self.conversations)
        else:
            self.samples = conversations.encode_all(
                conversations.load_conversations(path), self.tokenizer, self.max_length
            )
        self.sequences = (
            pack(self.samples, self.max_length) if config.packing else [[i] for i in range(len(self.samples))]
        )
        if config.packing and runtime.is_main:
            log.info(
                "packed %d conversations into %d sequences of up to %d tokens",
                len(self.samples),
                len(self.sequences),
                self.max_length,
            )

    def __len__(self) -> int:
        return len(self.sequences)

    def sample(self, index: int):
        if self.samples[index] is None:
            from vicunaflow import data as conversations

            self.samples[index] = conversations.encode(self.conversations[index], self.tokenizer, self.max_length)
        return self.samples[index]

    def collate(self, indices: Sequence[int]) -> dict:
        """Right-padded tensors for some sequences; packed ones get position_ids restarting per sample.

        With packing there is no attention_mask: transformers then derives a block-diagonal causal
        mask from the restarting position_ids, so packed conversations never see each other.
        """
        import torch

        rows = []
        for sequence in indices:
            ids, labels, positions = [], [], []
            for sample_index in self.sequences[sequence]:
                sample = self.sample(sample_index)
                ids += sample.input_ids
                labels += sample.labels
                positions += range(len(sample.input_ids))
            rows.append((ids, labels, positions))
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for row, (ids, row_labels, positions) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(row_labels)
            attention_mask[row, : len(ids)] = 1
            position_ids[row, : len(ids)] = torch.tensor(positions)
            position_ids[row, len(ids) :] = torch.arange(width - len(ids))  # padding: a sequence of its own
        num_tokens = sum(len(ids) for ids, _, _ in rows)  # without padding, for tokens/s
        if self.config.packing:
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "num_tokens": num_tokens}
        if num_tokens == input_ids.numel():
            # No padding: no mask at all, so SDPA runs its causal flash kernel without transformers
            # first checking the mask on the GPU (a host sync per micro-batch).
            return {"input_ids": input_ids, "labels": labels, "num_tokens": num_tokens}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "num_tokens": num_tokens}


def pack(samples: Sequence, max_length: int) -> list[list[int]]:
    """Group sample indices into sequences of at most max_length tokens, first fit in sample order.

    Deterministic (no shuffling here: the epoch order shuffles the packed sequences).
    """
    sequences: list[list[int]] = []
    room: list[int] = []
    for index, sample in enumerate(samples):
        length = len(sample.input_ids)
        for s, free in enumerate(room):
            if length <= free:
                sequences[s].append(index)
                room[s] -= length
                break
        else:
            sequences.append([index])
            room.append(max_length - length)
    return sequences


@dataclass
class Plan:
    """Which sequences each process sees at each step: a pure function of (seed, epoch, step).

    Like DistributedSampler: each epoch a seeded permutation of all sequences, padded by wrapping
    around to a multiple of the number of processes, process r taking every world_size-th one.
    The data position of a resumed run therefore follows from its step alone.
    """

    n_sequences: int
    world_size: int
    batch_size: int
    accumulation: int
    seed: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, n_sequences: int, config: TrainConfig, world_size: int) -> Plan:
        per_process = math.ceil(n_sequences / world_size)
        batches_per_epoch = math.ceil(per_process / config.per_device_train_batch_size)
        steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
        return cls(
            n_sequences, world_size, config.per_device_train_batch_size, config.gradient_accumulation_steps,
            config.seed, steps_per_epoch, total,
        )  # fmt: skip

    def is_checkpoint_step(self, done: int, config: TrainConfig) -> bool:
        if done >= self.total_steps:
            return False  # the final state goes to the output instead
        if config.save_strategy == "steps":
            return done % config.save_steps == 0
        return config.save_strategy == "epoch" and done % self.steps_per_epoch == 0

    def epoch_order(self, epoch: int, rank: int) -> list[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n_sequences, generator=generator).tolist()
        per_process = math.ceil(self.n_sequences / self.world_size)
        order += order[: per_process * self.world_size - len(order)]
        return order[rank :: self.world_size]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch, rank)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        first = step_in_epoch * self.accumulation
        return batches[first : first + self.accumulation]
