# Items for `snakemake --report report.html`: loss curves and run options of every fine-tune.
