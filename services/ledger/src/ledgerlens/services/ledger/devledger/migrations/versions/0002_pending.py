"""pending: submitted transactions not yet cut into a block

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "devledger_pending",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("tx_id", sa.String(length=128), nullable=False),
        sa.Column("submitted_at", sa.String(length=32), nullable=False),
        sa.Column("endorsement", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_devledger_pending")),
        sa.UniqueConstraint("tx_id", name=op.f("uq_devledger_pending_tx_id")),
    )


def downgrade() -> None:
    op.drop_table("devledger_pending")
