"""The model to train: loaded in float32, LoRA or QLoRA adapters if asked, sharded with FSDP2; its optimizer."""

from __future__ import annotations

import logging

from vicunaflow import VicunaflowError
from vicunaflow.finetune.config import Runtime, TrainConfig

log = logging.getLogger(__name__)


def build_model(config: TrainConfig, runtime: Runtime):
    """Load the model (float32 master weights), add LoRA if asked, and shard it with FSDP2.

    With several processes only rank 0 reads the weights; the others build the model on the meta
    device (no memory) and receive their shards from rank 0 once it is sharded. So a node needs
    host memory for one float32 copy of the model, not one per GPU.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.method == "qlora" and runtime.world_size > 1:
        raise VicunaflowError("--method qlora runs on one GPU; start it without torchrun or use --method lora")
    options = set(config.fsdp.split())
    sharded = runtime.world_size > 1 or "offload" in options
    on_meta = sharded and not runtime.is_main and "offload" not in options
    load_kwargs: dict = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if on_meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.model_path), **load_kwargs)
    else:
        if config.method == "qlora":
            load_kwargs |= _qlora_kwargs(runtime)
        model = AutoModelForCausalLM.from_pretrained(config.model_path, **load_kwargs)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    if config.compile:
        for layer in decoder_layers(model):
            # forward only: FSDP's hooks and the checkpoint wrapper stay in eager __call__ around it;
            # every layer runs the same code, so the graph compiled for the first serves them all.
            layer.forward = torch.compile(layer.forward)
    if config.method in ("lora", "qlora"):
        model = _add_lora(model, config)
    else:
        model.requires_grad_(True)
    if not sharded:
        # Nothing to shard: a plain module is faster (no gathers); bf16 then comes from autocast.
        return model.to(runtime.device)

    full_state = model.state_dict() if runtime.is_main else {}  # rank 0: the loaded weights (+ LoRA init)
    mixed = MixedPrecisionPolicy(param_dtype=runtime.dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if "offload" in options else OffloadPolicy()
    reshard = "shard_grad_op" not in options
    # One FSDP unit per decoder layer (FastChat's auto_wrap on LlamaDecoderLayer), then the rest.
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mixed, offload_policy=offload, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mixed, offload_policy=offload, reshard_after_forward=reshard)
    if "offload" in options:
        return model
    if on_meta:
        model.to_empty(device=runtime.device)
    model.to(runtime.device)
    options_broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state, options=options_broadcast)  # each rank keeps its shard
    del full_state
    for buffer in model.buffers():  # rotary frequencies: not in the state dict, computed on rank 0 only
        dist.broadcast(buffer, src=0)
    return model


def _enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant): transformers >= 5.20 renamed the method."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decoder_layers(model) -> list:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    if not layers:
        raise VicunaflowError(
            f"{type(model).__name__}: no LlamaDecoderLayer found; only LLaMA-architecture models are supported"
        )
    return layers


def _add_lora(model, config: TrainConfig):
    import torch
    from peft import LoraConfig, get_peft_model

    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    torch.manual_seed(config.seed)  # LoRA's A matrices are random: same seed, same start
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed layers still need a grad path
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA: %d trainable parameters of %d", trainable, sum(p.numel() for p in model.parameters()))
    return model


def _qlora_kwargs(runtime: Runtime) -> dict:
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise VicunaflowError("--method qlora needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from err
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=runtime.dtype if runtime.dtype == torch.bfloat16 else torch.float16,
    )
    return {"quantization_config": quantization, "device_map": {"": runtime.device.index}}


def build_optimizer(model, config: TrainConfig):
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = params[0].device.type == "cuda"  # one kernel for all parameters on GPUs
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused
    )
