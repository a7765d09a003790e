"""Initial schema: catalog, transactions, stages and the append-only event log.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

import tracking.models

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


_SQLITE_TRIGGERS = [
    """CREATE TRIGGER tx_event_no_update BEFORE UPDATE ON tx_event
       BEGIN SELECT RAISE(ABORT, 'tx_event is append-only'); END""",
    """CREATE TRIGGER tx_event_no_delete BEFORE DELETE ON tx_event
       BEGIN SELECT RAISE(ABORT, 'tx_event is append-only'); END""",
]
_POSTGRES_TRIGGERS = [
    """CREATE FUNCTION tx_event_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'tx_event is append-only'; END $$""",
    """CREATE TRIGGER tx_event_no_change BEFORE UPDATE OR DELETE ON tx_event
       FOR EACH ROW EXECUTE FUNCTION tx_event_append_only()""",
]


def _append_only_events() -> None:
    """The audit trail is append-only: the database refuses updates and deletes."""
    dialect = op.get_bind().dialect.name
    for statement in _SQLITE_TRIGGERS if dialect == "sqlite" else _POSTGRES_TRIGGERS:
        op.execute(statement)


def upgrade() -> None:
    op.create_table('tx_catalog_process',
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('dedup_strategy', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('dedup_fields', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.Column('registered_at', tracking.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', tracking.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('code')
    )
    op.create_table('tx_catalog_platform',
    sa.Column('process_code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('platform_order', sa.Integer(), nullable=False),
    sa.Column('stages', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=True),
    sa.Column('delay_seconds', sa.Float(), nullable=False),
    sa.Column('backoff', sa.Float(), nullable=False),
    sa.Column('max_delay_seconds', sa.Float(), nullable=True),
    sa.Column('jitter_seconds', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['process_code'], ['tx_catalog_process.code'], ),
    sa.PrimaryKeyConstraint('process_code', 'code')
    )
    op.create_table('tx_process',
    sa.Column('uuid', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('process_code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('business_key', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.Column('state', sa.Enum('PENDING', 'IN_PROGRESS', 'COMPLETED', 'REJECTED', 'TERMINATED', 'EXHAUSTED', 'CANCELLED', name='txstate', native_enum=False, length=16), nullable=False),
    sa.Column('created_at', tracking.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', tracking.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', tracking.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['process_code'], ['tx_catalog_process.code'], ),
    sa.PrimaryKeyConstraint('uuid'),
    sa.UniqueConstraint('process_code', 'fingerprint', name='uq_tx_process_fingerprint')
    )
    with op.batch_alter_table('tx_process', schema=None) as batch_op:
        batch_op.create_index('ix_tx_process_created_at', ['created_at'], unique=False)
        batch_op.create_index('ix_tx_process_process_state', ['process_code', 'state'], unique=False)

    op.create_table('tx_event',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('uuid', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('process_code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('kind', sa.Enum('CREATED', 'ATTEMPT', 'LEASE_EXPIRED', 'CANCELLED', 'REQUEUED', name='eventkind', native_enum=False, length=16), nullable=False),
    sa.Column('platform', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('stage', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=True),
    sa.Column('outcome', sa.Enum('SUCCESS', 'BUSINESS_ERROR', 'SYSTEM_ERROR', name='outcome', native_enum=False, length=16), nullable=True),
    sa.Column('error_code', sa.Integer(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('traceback', sa.Text(), nullable=True),
    sa.Column('from_state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('to_state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('tx_state', sa.Enum('PENDING', 'IN_PROGRESS', 'COMPLETED', 'REJECTED', 'TERMINATED', 'EXHAUSTED', 'CANCELLED', name='txstate', native_enum=False, length=16), nullable=True),
    sa.Column('actor', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
    sa.Column('flow_run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True),
    sa.Column('task_run_id', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=True),
    sa.Column('started_at', tracking.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', tracking.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['uuid'], ['tx_process.uuid'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('tx_event', schema=None) as batch_op:
        batch_op.create_index('ix_tx_event_process_created', ['process_code', 'created_at'], unique=False)
        batch_op.create_index('ix_tx_event_uuid', ['uuid', 'id'], unique=False)

    op.create_table('tx_stage',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('uuid', sqlmodel.sql.sqltypes.AutoString(length=36), nullable=False),
    sa.Column('process_code', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('platform', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('stage', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('platform_order', sa.Integer(), nullable=False),
    sa.Column('state', sa.Enum('PENDING', 'IN_PROGRESS', 'COMPLETED', 'REJECTED', 'TERMINATED', 'EXHAUSTED', 'CANCELLED', name='stagestate', native_enum=False, length=16), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('attempts_allowed', sa.Integer(), nullable=True),
    sa.Column('next_attempt_at', tracking.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('lease_owner', sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True),
    sa.Column('lease_expires_at', tracking.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('started_at', tracking.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('error_code', sa.Integer(), nullable=True),
    sa.Column('error_type', sa.Enum('BUSINESS', 'SYSTEM', name='errortype', native_enum=False, length=16), nullable=True),
    sa.Column('error_description', sa.Text(), nullable=True),
    sa.Column('created_at', tracking.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', tracking.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', tracking.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['uuid'], ['tx_process.uuid'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('uuid', 'platform', 'stage', name='uq_tx_stage_platform_stage'),
    sa.UniqueConstraint('uuid', 'seq', name='uq_tx_stage_seq')
    )
    with op.batch_alter_table('tx_stage', schema=None) as batch_op:
        batch_op.create_index('ix_tx_stage_lease', ['process_code', 'platform', 'lease_expires_at'], unique=False, sqlite_where=sa.text('lease_expires_at IS NOT NULL'), postgresql_where=sa.text('lease_expires_at IS NOT NULL'))
        batch_op.create_index('ix_tx_stage_process_state', ['process_code', 'platform', 'stage', 'state'], unique=False)
        batch_op.create_index('ix_tx_stage_runnable', ['process_code', 'platform', 'stage', 'next_attempt_at'], unique=False, sqlite_where=sa.text('next_attempt_at IS NOT NULL'), postgresql_where=sa.text('next_attempt_at IS NOT NULL'))


    _append_only_events()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS tx_event_no_change ON tx_event")
        op.execute("DROP FUNCTION IF EXISTS tx_event_append_only()")
    with op.batch_alter_table('tx_stage', schema=None) as batch_op:
        batch_op.drop_index('ix_tx_stage_runnable', sqlite_where=sa.text('next_attempt_at IS NOT NULL'), postgresql_where=sa.text('next_attempt_at IS NOT NULL'))
        batch_op.drop_index('ix_tx_stage_process_state')
        batch_op.drop_index('ix_tx_stage_lease', sqlite_where=sa.text('lease_expires_at IS NOT NULL'), postgresql_where=sa.text('lease_expires_at IS NOT NULL'))

    op.drop_table('tx_stage')
    with op.batch_alter_table('tx_event', schema=None) as batch_op:
        batch_op.drop_index('ix_tx_event_uuid')
        batch_op.drop_index('ix_tx_event_process_created')

    op.drop_table('tx_event')
    with op.batch_alter_table('tx_process', schema=None) as batch_op:
        batch_op.drop_index('ix_tx_process_process_state')
        batch_op.drop_index('ix_tx_process_created_at')

    op.drop_table('tx_process')
    op.drop_table('tx_catalog_platform')
    op.drop_table('tx_catalog_process')
