//! Running the external tools a build leans on (debootstrap, tar, zstd) with their output
//! captured, so a failure can quote what the tool said instead of "exit status 1".

use crate::ImageError;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

/// How many trailing lines of a tool's output an error quotes: enough for debootstrap's
/// "E: ..." and the lines that lead to it, short enough to read in a terminal.
const TAIL_LINES: usize = 12;

/// Runs `cmd` to completion, capturing stdout and stderr (logged at debug level line by
/// line), and fails with the output's tail when the exit status is not success.
pub(crate) fn run(cmd: &mut Command) -> Result<(), ImageError> {
    let program = program_name(cmd);
    let mut child = spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?;
    let out = child.stdout.take().map(|s| collect_lines(&program, s));
    let err = child.stderr.take().map(|s| collect_lines(&program, s));
    let status = child.wait().map_err(|source| ImageError::Spawn {
        program: program.clone(),
        source,
    })?;
    let mut lines = join(out);
    lines.extend(join(err));
    check(&program, status, &lines)
}

pub(crate) fn spawn(cmd: &mut Command) -> Result<Child, ImageError> {
    cmd.spawn().map_err(|source| ImageError::Spawn {
        program: program_name(cmd),
        source,
    })
}

/// Reads a child's stream on its own thread, so a chatty stderr cannot fill its pipe and
/// stall the child while the caller is busy with stdout.
pub(crate) fn collect_lines(
    program: &str,
    stream: impl Read + Send + 'static,
) -> JoinHandle<Vec<String>> {
    let program = program.to_string();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            tracing::debug!(target: "hearth_images::process", "{program}: {line}");
            lines.push(line);
        }
        lines
    })
}

pub(crate) fn join(handle: Option<JoinHandle<Vec<String>>>) -> Vec<String> {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}

pub(crate) fn tail(lines: &[String]) -> String {
    let start = lines.len().saturating_sub(TAIL_LINES);
    lines[start..].join("\n")
}

pub(crate) fn check(program: &str, status: ExitStatus, lines: &[String]) -> Result<(), ImageError> {
    if status.success() {
        Ok(())
    } else {
        Err(ImageError::Command {
            program: program.to_string(),
            status,
            output: tail(lines),
        })
    }
}

pub(crate) fn program_name(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}
