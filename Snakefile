# vicunaflow: LLaMA -> Hugging Face -> Vicuna v1.1 -> fine-tune -> chat, as one Snakemake DAG.
# See README.md; the configuration is documented in config/README.md.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/eval_common.smk"
include: "workflow/rules/data_common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/delta.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/dataprep.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/serve.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/eval.smk"


rule all:
    default_target: True
    input:
        get_final_output(),
