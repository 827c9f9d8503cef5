"""The report stage: Tables 1-6 and Figure 2 of Dong et al. (EMNLP 2021) from the pipeline's outputs.

* :mod:`hrkd.report.collect` - reads the metrics files other stages declare as outputs;
* :mod:`hrkd.report.paper` - the paper's numbers (``paper_values.yaml``, with table/row provenance);
* :mod:`hrkd.report.stats` - mean ± std, the paired t-test, the few-shot improvement rate;
* :mod:`hrkd.report.tables` - the tables as data, rendered to Markdown and CSV;
* :mod:`hrkd.report.case_study` - Tables 5-6 from the HRKD student's ``_relational/`` state;
* :mod:`hrkd.report.figures` - Figure 2 and the ratio heatmap (matplotlib, Agg);
* :mod:`hrkd.report.build` - the stage itself (``build_report``) and :mod:`hrkd.report.readme`
  the README splice.

Heavy libraries (torch, matplotlib, scipy) are imported inside the functions that need them.
"""
