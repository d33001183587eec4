"""Evaluation: FLOPs and parameter counts."""

from .flops import (PAPER_FLOPS_G, PAPER_PARAMS_M, analytic_flops, count_parameters,
                    counted_flops, flops_report, thop_style_macs)

__all__ = ["PAPER_FLOPS_G", "PAPER_PARAMS_M", "analytic_flops", "count_parameters",
           "counted_flops", "flops_report", "thop_style_macs"]
