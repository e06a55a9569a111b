"""Each VM's private host id range (container VMs' user namespaces): ``vms.id_base``, unique.

Existing VMs get a range here, in order of creation; their disks need no change (files keep guest ids on disk and
are id-mapped at mount time). A VM that was running during the upgrade keeps running as before (no user
namespace) until it is next started.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FIRST_HOST_ID = 2**24  # ussycode.runtime.idmap at the time of this migration
RANGE = 65536


def upgrade() -> None:
    # A plain ADD COLUMN and a unique index: SQLite's batch mode would rebuild ``vms``, and dropping the old table
    # cascades (foreign keys are on) to every row that references a VM.
    op.add_column("vms", sa.Column("id_base", sa.BigInteger, nullable=True))
    op.create_index("uq_vms_id_base", "vms", ["id_base"], unique=True)
    conn = op.get_bind()
    vms = sa.table("vms", sa.column("id", sa.String), sa.column("created_at", sa.DateTime),
                   sa.column("id_base", sa.BigInteger))
    ids = conn.execute(sa.select(vms.c.id).order_by(vms.c.created_at, vms.c.id)).scalars().all()
    for slot, vm_id in enumerate(ids):
        conn.execute(vms.update().where(vms.c.id == vm_id).values(id_base=FIRST_HOST_ID + slot * RANGE))


def downgrade() -> None:
    op.drop_index("uq_vms_id_base", "vms")
    op.drop_column("vms", "id_base")
