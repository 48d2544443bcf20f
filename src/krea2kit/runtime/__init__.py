"""Run-time glue between the plan and the parts: filters, outputs, adapters."""
