# Items for `snakemake --report report.html`: the loss curve and options of every fine-tuning run.
# (Chat transcripts come from serve.smk; per-job time and memory from each rule's benchmark file.)


rule finetune_report:
    input:
        "fine_tuning_output/{run}",
    output:
        loss=report(
            "results/finetune/{run}/loss.svg",
            caption="../report/loss.rst",
            category="Fine-tuning",
            subcategory="{run}",
        ),
        options=report(
            "results/finetune/{run}/options.tsv",
            caption="../report/options.rst",
            category="Fine-tuning",
            subcategory="{run}",
        ),
    log:
        "logs/finetune_report/{run}.log",
    localrule: True
    conda:
        "../../envs/finetune.yaml"
    shell:
        "vicunaflow report finetune --run-dir {input} --loss-plot {output.loss}"
        " --options-table {output.options} > {log} 2>&1"
