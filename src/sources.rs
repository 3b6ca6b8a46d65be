//! Ready-made sources: from an iterator, a `Stream`, or a channel; and for
//! the most common inputs, the files of a directory ([`files`]) and the
//! lines of a file ([`lines`]) or of stdin ([`stdin_lines`]).
//!
//! ```
//! use bergtalzug::prelude::*;
//!
//! let numbers = sources::iter(0..1000u32);            // data, one item each
//! let named = sources::items(vec![WorkItem::with_job_id("a", 1u8)]);
//! let (tx, rx) = sources::channel::<String>(64);     // fed while running
//! assert_eq!(numbers.size_hint(), Some(1000));        // known: progress shows a total
//! assert_eq!(rx.size_hint(), None);                   // unknown: a spinner
//! # drop((numbers, named, tx, rx));
//! ```

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::Context;
use futures::{FutureExt, Stream, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use crate::{Source, WorkItem};

/// A source over an iterator of work items; see [`items`].
///
/// The iterator is advanced on the source actor's task: it should not block
/// for long (use [`channel`] or your own [`Source`] for blocking input).
#[derive(Debug)]
pub struct IterSource<I> {
    iter: I,
}

/// A source over an iterator of data, each element made a [`WorkItem`]; see
/// [`iter`].
///
/// The iterator is advanced on the source actor's task: it should not block
/// for long (use [`channel`] or your own [`Source`] for blocking input).
#[derive(Debug)]
pub struct DataSource<I> {
    iter: I,
}

/// Each element becomes a [`WorkItem`] with a random job id; the items of
/// one refill share one reading of the clock as their creation time
/// ([`WorkItem::many`]).
pub fn iter<I>(data: I) -> DataSource<I::IntoIter>
where
    I: IntoIterator,
    I::Item: Send + 'static,
    I::IntoIter: Send + 'static,
{
    DataSource {
        iter: data.into_iter(),
    }
}

/// Work items made by the caller (with their own job ids or metadata).
pub fn items<I, T>(items: I) -> IterSource<I::IntoIter>
where
    I: IntoIterator<Item = WorkItem<T>>,
    I::IntoIter: Send + 'static,
    T: Send + 'static,
{
    IterSource {
        iter: items.into_iter(),
    }
}

impl<I, T> Source for IterSource<I>
where
    I: Iterator<Item = WorkItem<T>> + Send + 'static,
    T: Send + 'static,
{
    type Item = T;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<T>>> {
        Ok(self.iter.by_ref().take(count).collect())
    }

    /// The iterator's length when it knows it exactly (a range, a `Vec`).
    fn size_hint(&self) -> Option<u64> {
        exact(self.iter.size_hint())
    }
}

impl<I> Source for DataSource<I>
where
    I: Iterator + Send + 'static,
    I::Item: Send + 'static,
{
    type Item = I::Item;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<I::Item>>> {
        Ok(WorkItem::many(self.iter.by_ref().take(count)))
    }

    /// The iterator's length when it knows it exactly (a range, a `Vec`).
    fn size_hint(&self) -> Option<u64> {
        exact(self.iter.size_hint())
    }
}

fn exact((low, high): (usize, Option<usize>)) -> Option<u64> {
    (high == Some(low)).then_some(low as u64)
}

/// A source over a `Stream` of work items; see [`stream`].
///
/// `refill` waits for the first item, then takes whatever else is ready, up
/// to the count asked for: a slow stream never delays items it already has.
pub struct StreamSource<S> {
    /// Fused: a stream that ended is never polled again.
    stream: std::pin::Pin<Box<futures::stream::Fuse<S>>>,
}

impl<S> std::fmt::Debug for StreamSource<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamSource")
    }
}

/// Reads work items from a stream; the pipeline's input ends with it.
pub fn stream<S, T>(stream: S) -> StreamSource<S>
where
    S: Stream<Item = WorkItem<T>> + Send + 'static,
    T: Send + 'static,
{
    StreamSource {
        stream: Box::pin(stream.fuse()),
    }
}

impl<S, T> Source for StreamSource<S>
where
    S: Stream<Item = WorkItem<T>> + Send + 'static,
    T: Send + 'static,
{
    type Item = T;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<T>>> {
        let mut batch = Vec::new();
        let Some(first) = self.stream.next().await else {
            return Ok(batch);
        };
        batch.push(first);
        while batch.len() < count {
            match self.stream.next().now_or_never() {
                Some(Some(item)) => batch.push(item),
                _ => break,
            }
        }
        Ok(batch)
    }

    /// The stream's length when it knows it exactly.
    fn size_hint(&self) -> Option<u64> {
        exact(self.stream.size_hint())
    }
}

/// A source fed through a channel; see [`channel`].
#[derive(Debug)]
pub struct ChannelSource<T> {
    rx: mpsc::Receiver<WorkItem<T>>,
}

/// A bounded channel whose receiving end is a source: send work items into
/// the pipeline while it runs; the input ends when every sender is dropped.
/// `capacity` bounds what waits in the channel.
pub fn channel<T: Send + 'static>(
    capacity: usize,
) -> (mpsc::Sender<WorkItem<T>>, ChannelSource<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelSource { rx })
}

/// A source over an existing receiver.
pub fn from_receiver<T: Send + 'static>(rx: mpsc::Receiver<WorkItem<T>>) -> ChannelSource<T> {
    ChannelSource { rx }
}

impl<T: Send + 'static> Source for ChannelSource<T> {
    type Item = T;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<T>>> {
        let mut batch = Vec::with_capacity(count.min(1024));
        // Waits for at least one item, or returns none once the channel closed.
        self.rx.recv_many(&mut batch, count).await;
        Ok(batch)
    }
}

/// The files of a directory tree whose paths match a glob; see [`files`].
///
/// Each item is a file's path (the root joined with the relative path), and
/// its job id the path relative to the root (`2024/03/orders.csv`), so
/// results and dead letters name the file.
pub struct FileSource {
    root: PathBuf,
    pattern: Glob,
    /// The walk, between refills; `None` once it ended.
    walk: Option<walkdir::IntoIter>,
    /// Matching files counted when the source was made.
    counted: u64,
    /// An error met after the items of the last batch, for the next refill.
    deferred: Option<anyhow::Error>,
}

impl std::fmt::Debug for FileSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSource")
            .field("root", &self.root)
            .field("pattern", &self.pattern.pattern.as_str())
            .field("counted", &self.counted)
            .finish_non_exhaustive()
    }
}

/// A compiled glob and how deep it can reach.
#[derive(Clone)]
struct Glob {
    pattern: glob::Pattern,
    /// How many path components a match can have; `None` with a `**`.
    depth: Option<usize>,
}

impl Glob {
    fn new(pattern: &str) -> anyhow::Result<Self> {
        let compiled = glob::Pattern::new(pattern)
            .with_context(|| format!("`{pattern}` is not a valid glob pattern"))?;
        let components = pattern.split('/').filter(|c| !c.is_empty());
        let depth = (!pattern.contains("**")).then(|| components.count().max(1));
        Ok(Glob {
            pattern: compiled,
            depth,
        })
    }

    /// The walk of `root` this glob needs: sorted by name, so that the
    /// order is the same every run; links not followed.
    fn walk(&self, root: &Path) -> walkdir::IntoIter {
        let walk = walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name();
        match self.depth {
            Some(depth) => walk.max_depth(depth),
            None => walk,
        }
        .into_iter()
    }

    /// The path relative to `root` when `entry` is a file that matches.
    fn matches<'e>(&self, root: &Path, entry: &'e walkdir::DirEntry) -> Option<&'e Path> {
        if !entry.file_type().is_file() {
            return None;
        }
        let relative = entry.path().strip_prefix(root).ok()?;
        let options = glob::MatchOptions {
            case_sensitive: true,
            // `*` stays within one directory, as in a shell; `**` crosses them.
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        self.pattern
            .matches_path_with(relative, options)
            .then_some(relative)
    }
}

/// The files under `root` whose path relative to `root` matches `pattern`,
/// in name order, one item each: the data is the file's path, the job id
/// its relative path.
///
/// The pattern is a glob (the `glob` crate's syntax): `*` and `?` stay
/// within one directory, `**` matches any number of them, `[abc]` one of
/// the characters. `"*.csv"` takes the CSV files in `root` itself,
/// `"**/*.csv"` those in the whole tree, `"**/*"` every file. Symbolic
/// links are not followed.
///
/// The files are counted first, by one walk of the tree on the calling
/// thread, so [`size_hint`](Source::size_hint) is the number of matching
/// files and a progress bar shows a total; the pipeline then walks the tree
/// again, a batch per refill on a blocking thread. Memory does not grow
/// with the tree: no list of paths is kept.
///
/// An entry that cannot be read during the walk (a directory without
/// permission, a file removed meanwhile) is a refill error after the items
/// before it: logged, published as a `SourceError` and counted in
/// `source_errors`, and the walk goes on past it when the source is asked
/// again.
///
/// # Errors
///
/// When `pattern` is not a valid glob (e.g. `a**`), or `root` is not a
/// directory that can be read.
///
/// # Examples
///
/// ```
/// use bergtalzug::prelude::*;
///
/// # fn main() -> anyhow::Result<()> {
/// let dir = tempfile::tempdir()?;
/// std::fs::create_dir(dir.path().join("2024"))?;
/// for name in ["a.json", "b.txt", "2024/c.json"] {
///     std::fs::write(dir.path().join(name), "{}")?;
/// }
/// let all = sources::files(dir.path(), "**/*.json")?;
/// assert_eq!(all.size_hint(), Some(2)); // a.json and 2024/c.json
/// let top = sources::files(dir.path(), "*.json")?;
/// assert_eq!(top.size_hint(), Some(1)); // a.json only
/// assert!(sources::files(dir.path().join("missing"), "*").is_err());
/// # Ok(()) }
/// ```
pub fn files(root: impl AsRef<Path>, pattern: &str) -> anyhow::Result<FileSource> {
    let root = root.as_ref().to_path_buf();
    let pattern = Glob::new(pattern)?;
    std::fs::read_dir(&root)
        .with_context(|| format!("cannot read directory {}", root.display()))?;
    let counted = pattern
        .walk(&root)
        .filter_map(Result::ok)
        .filter(|entry| pattern.matches(&root, entry).is_some())
        .count() as u64;
    Ok(FileSource {
        walk: Some(pattern.walk(&root)),
        root,
        pattern,
        counted,
        deferred: None,
    })
}

impl Source for FileSource {
    type Item = PathBuf;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<PathBuf>>> {
        if let Some(error) = self.deferred.take() {
            return Err(error);
        }
        let Some(mut walk) = self.walk.take() else {
            return Ok(Vec::new());
        };
        let (root, pattern) = (self.root.clone(), self.pattern.clone());
        // Reading directories blocks: off the runtime's workers.
        let (walk, batch, error) = tokio::task::spawn_blocking(move || {
            let mut batch = Vec::new();
            while batch.len() < count {
                match walk.next() {
                    None => return (None, batch, None),
                    Some(Ok(entry)) => {
                        if let Some(relative) = pattern.matches(&root, &entry) {
                            let job_id = relative.to_string_lossy().into_owned();
                            batch.push(WorkItem::with_job_id(job_id, entry.into_path()));
                        }
                    }
                    Some(Err(e)) => return (Some(walk), batch, Some(e)),
                }
            }
            (Some(walk), batch, None)
        })
        .await
        .context("the directory walk ended abnormally")?;
        self.walk = walk;
        let error = error.map(|e| anyhow::Error::new(e).context("cannot read a directory entry"));
        match error {
            Some(error) if batch.is_empty() => Err(error),
            error => {
                self.deferred = error;
                Ok(batch)
            }
        }
    }

    /// The matching files counted when the source was made.
    fn size_hint(&self) -> Option<u64> {
        Some(self.counted)
    }
}

/// Counts the lines of what `read` gives: newlines, plus a last line
/// without one. Reads in blocks; keeps nothing.
fn count_lines(mut read: impl std::io::Read) -> std::io::Result<u64> {
    let mut block = vec![0u8; 64 * 1024];
    let (mut lines, mut last) = (0u64, b'\n');
    loop {
        let n = match read.read(&mut block) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        lines += block[..n].iter().filter(|b| **b == b'\n').count() as u64;
        last = block[n - 1];
    }
    Ok(lines + u64::from(last != b'\n'))
}

/// One line as text: its line ending taken off, or why it is not text.
fn decode_line(mut bytes: Vec<u8>, name: &str, number: u64) -> anyhow::Result<String> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!("line {number} of {name} is not UTF-8 text ({e}); it was skipped")
    })
}

/// Lines read but not handed out yet: a line, or why one could not be.
type Pending = std::collections::VecDeque<anyhow::Result<WorkItem<String>>>;

/// Up to `count` lines from the front of `pending`, stopping before an
/// error; an error at the front is returned (and taken) alone.
fn take_lines(pending: &mut Pending, count: usize) -> anyhow::Result<Vec<WorkItem<String>>> {
    if let Some(Err(_)) = pending.front()
        && let Some(Err(error)) = pending.pop_front()
    {
        return Err(error);
    }
    let mut batch = Vec::new();
    while batch.len() < count {
        match pending.pop_front() {
            Some(Ok(item)) => batch.push(item),
            Some(Err(error)) => {
                pending.push_front(Err(error));
                break;
            }
            None => break,
        }
    }
    Ok(batch)
}

/// The lines of a file; see [`lines`].
#[derive(Debug)]
pub struct LineSource {
    name: String,
    reader: tokio::io::BufReader<tokio::fs::File>,
    /// The number of the next line, from 1.
    next: u64,
    counted: u64,
    done: bool,
    pending: Pending,
}

/// The lines of the file at `path`, one item each: the data is the line
/// without its line ending (`\n` or `\r\n`), the job id `<path>:<number>`
/// with lines numbered from 1 (`data/input.txt:17`).
///
/// The lines are counted first, by one read of the file on the calling
/// thread, so [`size_hint`](Source::size_hint) is the number of lines (not
/// of bytes) and a progress bar shows a total; the pipeline then reads the
/// file again, buffered, as it asks for lines. Memory holds one buffer and
/// the lines in flight, never the file.
///
/// A line that is not UTF-8 text is skipped with a refill error naming its
/// number, after the lines before it: logged, published as a `SourceError`
/// and counted in `source_errors`; the lines after it follow.
///
/// # Errors
///
/// When the file cannot be opened or read.
///
/// # Examples
///
/// ```
/// use bergtalzug::prelude::*;
///
/// # fn main() -> anyhow::Result<()> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("urls.txt");
/// std::fs::write(&path, "https://example.com/1\nhttps://example.com/2\n")?;
/// let source = sources::lines(&path)?;
/// assert_eq!(source.size_hint(), Some(2));
/// assert!(sources::lines(dir.path().join("missing.txt")).is_err());
/// # Ok(()) }
/// ```
pub fn lines(path: impl AsRef<Path>) -> anyhow::Result<LineSource> {
    let path = path.as_ref();
    let open =
        || std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()));
    let counted =
        count_lines(open()?).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(LineSource {
        name: path.display().to_string(),
        reader: tokio::io::BufReader::with_capacity(64 * 1024, tokio::fs::File::from_std(open()?)),
        next: 1,
        counted,
        done: false,
        pending: Pending::new(),
    })
}

impl LineSource {
    async fn next_line(&mut self) -> Option<anyhow::Result<WorkItem<String>>> {
        if self.done {
            return None;
        }
        let mut bytes = Vec::new();
        match self.reader.read_until(b'\n', &mut bytes).await {
            Ok(0) => {
                self.done = true;
                None
            }
            Ok(_) => {
                let number = self.next;
                self.next += 1;
                let job_id = format!("{}:{number}", self.name);
                Some(
                    decode_line(bytes, &self.name, number)
                        .map(|l| WorkItem::with_job_id(job_id, l)),
                )
            }
            Err(e) => Some(Err(anyhow::Error::new(e)
                .context(format!("cannot read line {} of {}", self.next, self.name)))),
        }
    }
}

impl Source for LineSource {
    type Item = String;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<String>>> {
        // Reads ahead to `count` lines, or to the first one that fails.
        while self.pending.is_empty() || self.pending.len() < count {
            match self.next_line().await {
                None => break,
                Some(line) => {
                    let failed = line.is_err();
                    self.pending.push_back(line);
                    if failed {
                        break;
                    }
                }
            }
        }
        take_lines(&mut self.pending, count)
    }

    /// The lines counted when the source was made.
    fn size_hint(&self) -> Option<u64> {
        Some(self.counted)
    }
}

/// The lines of the program's standard input; see [`stdin_lines`].
#[derive(Debug)]
pub struct StdinSource {
    /// Filled by the reading thread, started on the first refill.
    lines: Option<mpsc::Receiver<anyhow::Result<WorkItem<String>>>>,
    counted: Option<u64>,
    pending: Pending,
}

/// How many lines the reading thread may read ahead of the pipeline.
const STDIN_READ_AHEAD: usize = 1024;

/// The lines of standard input, one item each, as [`lines`] gives them
/// (job ids `stdin:<number>`); the input ends at end of file (a closed
/// pipe, Ctrl-D in a terminal).
///
/// A thread of its own reads stdin, at most 1,024 lines ahead of the
/// pipeline; it is not one of tokio's blocking threads, so a read that
/// waits for a terminal never keeps the program from exiting. It starts on
/// the first refill, so making the source reads nothing.
///
/// [`size_hint`](Source::size_hint): when stdin is a regular file
/// (`program < data.txt`, on Unix), its lines from the current position,
/// counted when the source is made without moving that position; for a
/// pipe or a terminal, `None` (a spinner with a rate instead of a bar).
///
/// ```no_run
/// use bergtalzug::prelude::*;
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = PipelineConfig::new("upper", vec![StageConfig::new("upper", ExecutionType::Async)]);
/// Pipeline::builder(config)?
///     .source(sources::stdin_lines())
///     .async_stage("upper", |line: WorkItem<String>| async move {
///         println!("{}", line.data.to_uppercase());
///         Ok(line)
///     })
///     .build()?
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
pub fn stdin_lines() -> StdinSource {
    StdinSource {
        lines: None,
        counted: stdin_file_lines(),
        pending: Pending::new(),
    }
}

/// The lines left in stdin when it is a regular file, read without moving
/// its position.
#[cfg(unix)]
fn stdin_file_lines() -> Option<u64> {
    use std::io::Seek;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    let mut file = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned().ok()?);
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let start = file.stream_position().ok()?;
    struct At<'f>(&'f std::fs::File, u64);
    impl std::io::Read for At<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read_at(buf, self.1)?;
            self.1 += n as u64;
            Ok(n)
        }
    }
    count_lines(At(&file, start)).ok()
}

#[cfg(not(unix))]
fn stdin_file_lines() -> Option<u64> {
    None
}

/// Reads stdin line by line into `tx` until end of file, a read error, or
/// a closed receiver. A line that is not text is sent as an error, and the
/// reading goes on.
fn read_stdin(tx: mpsc::Sender<anyhow::Result<WorkItem<String>>>) {
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    for number in 1u64.. {
        let mut bytes = Vec::new();
        match stdin.read_until(b'\n', &mut bytes) {
            Ok(0) => return,
            Ok(_) => {
                let line = decode_line(bytes, "stdin", number)
                    .map(|l| WorkItem::with_job_id(format!("stdin:{number}"), l));
                if tx.blocking_send(line).is_err() {
                    return;
                }
            }
            Err(e) => {
                let context = format!("cannot read line {number} of stdin");
                let _ = tx.blocking_send(Err(anyhow::Error::new(e).context(context)));
                return;
            }
        }
    }
}

impl Source for StdinSource {
    type Item = String;

    async fn refill(&mut self, count: usize) -> anyhow::Result<Vec<WorkItem<String>>> {
        if self.pending.is_empty() {
            let lines = self.lines.get_or_insert_with(|| {
                let (tx, rx) = mpsc::channel(STDIN_READ_AHEAD);
                std::thread::Builder::new()
                    .name("bergtalzug-stdin".into())
                    .spawn(move || read_stdin(tx))
                    .expect("a thread to read stdin");
                rx
            });
            let mut read = Vec::with_capacity(count.min(STDIN_READ_AHEAD));
            // None once the thread ended and everything it sent was taken.
            lines.recv_many(&mut read, count).await;
            self.pending.extend(read);
        }
        take_lines(&mut self.pending, count)
    }

    /// Lines left in stdin when it is a regular file; `None` otherwise.
    fn size_hint(&self) -> Option<u64> {
        self.counted
    }
}
