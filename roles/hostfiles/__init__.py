"""Layer 4: a hardened host's files as one transaction: the plan from the facts and
``roles.core.hardened`` (plan.py), then check unchanged, write a candidate, validate, keep
a backup, rename into place, reload, roll back on failure (transaction.py).
"""
