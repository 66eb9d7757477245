"""tasks/common/parquet.py: streaming readers hold a row group at a time, not the whole file."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from corpus2model.tasks.common.parquet import open_parquet


def _peak_while_streaming(pf: pq.ParquetFile) -> int:
    base = pa.total_allocated_bytes()
    peak = 0
    for batch in pf.iter_batches(batch_size=1000):
        peak = max(peak, pa.total_allocated_bytes() - base)
        del batch
    return peak


def test_streaming_a_file_holds_about_a_row_group_not_the_file(tmp_path):
    """pyarrow's default (pre_buffer=True) reads every column chunk of the file before the first batch: a
    reader's memory grew with the size of the part or shard it streamed (411 MiB for a 370 MB part)."""
    path = tmp_path / "big.parquet"
    text = pa.array([f"{i:08d}" + "x" * 3000 for i in range(10_000)])  # ~30 MB, 10 row groups of 3 MB
    pq.write_table(pa.table({"text": text}), path, compression="none", row_group_size=1000)
    size = path.stat().st_size
    assert _peak_while_streaming(pq.ParquetFile(path)) > size  # what the default does: the whole file
    assert _peak_while_streaming(open_parquet(path)) < size / 3
