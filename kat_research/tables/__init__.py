"""Result tables from job folders: per-job measures, aggregation over seeds with missing cells
reported, the paper's numbers side by side, CSV / Markdown / LaTeX writers and PNG figures."""
