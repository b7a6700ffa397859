//! The Dockerfile builds what CI builds and copies what exists. There is no container engine on
//! the CI machines, so the image's build command is checked to be, word for word, the release
//! build `.ci/run` runs; the sources it copies to be the workspace's members; the binaries it
//! takes from the build stage to be where that build puts them; and the runtime user to be the
//! UID the capture rules exempt.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The Dockerfile's instructions as (keyword, arguments), continuation lines joined.
fn instructions() -> Vec<(String, String)> {
    let text = read("Dockerfile").replace("\\\n", " ");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, rest) = l.split_once(' ').unwrap_or((l, ""));
            (
                k.to_uppercase(),
                rest.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

fn stages() -> Vec<Vec<(String, String)>> {
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for (k, v) in instructions() {
        if k == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push((k, v));
    }
    stages
}

#[test]
fn the_image_builds_with_the_release_build_ci_runs() {
    let stages = stages();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let builds: Vec<_> = stages[0]
        .iter()
        .filter(|(k, v)| k == "RUN" && v.starts_with("cargo build"))
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(builds.len(), 1, "one cargo build in the build stage");
    let build = &builds[0];
    for word in [
        "--release",
        "--locked",
        "-p trellis-proxy",
        "-p trellis-control",
    ] {
        assert!(build.contains(word), "{build:?} lacks {word}");
    }
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == build),
        ".ci/run does not run the image's build {build:?} as a line of its own"
    );
}

#[test]
fn the_build_stage_copies_every_workspace_member_and_nothing_missing() {
    let stages = stages();
    let copied: Vec<String> = stages[0]
        .iter()
        .filter(|(k, _)| k == "COPY")
        .flat_map(|(_, v)| {
            let words: Vec<_> = v.split(' ').map(str::to_owned).collect();
            words[..words.len() - 1].to_vec()
        })
        .collect();
    for path in &copied {
        assert!(
            !path.starts_with("--"),
            "the build stage copies from the context only"
        );
        assert!(root().join(path).exists(), "COPY {path}: no such path");
    }
    let manifest: toml_members::Workspace = toml_members::parse(&read("Cargo.toml"));
    for member in manifest.members {
        assert!(
            copied.contains(&member),
            "workspace member {member} is not copied: the build would fail"
        );
    }
    for file in ["Cargo.toml", "Cargo.lock"] {
        assert!(copied.iter().any(|c| c == file), "{file} is not copied");
    }
    // None of them may be ignored by .dockerignore, or the COPY fails in the engine.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for path in &copied {
        assert!(
            !ignored.contains(path),
            "{path} is copied but .dockerignore drops it"
        );
    }
    for must in [".git", "**/target", "fuzz"] {
        assert!(
            ignored.iter().any(|i| i == must),
            ".dockerignore should drop {must}"
        );
    }
}

#[test]
fn the_runtime_stage_runs_both_binaries_as_the_proxy_uid() {
    let stages = stages();
    let build_dir = stages[0]
        .iter()
        .rev()
        .find(|(k, _)| k == "WORKDIR")
        .map(|(_, v)| v.clone())
        .expect("a WORKDIR in the build stage");
    let alias = stages[0][0].1.rsplit(' ').next().unwrap().to_owned();
    let runtime = &stages[1];
    let from_build: Vec<&str> = runtime
        .iter()
        .filter(|(k, v)| k == "COPY" && v.starts_with(&format!("--from={alias} ")))
        .flat_map(|(_, v)| {
            let words: Vec<_> = v.split(' ').collect();
            words[1..words.len() - 1].to_vec()
        })
        .collect();
    for bin in ["trellis-proxy", "trellis-control"] {
        let expected = format!("{build_dir}/target/release/{bin}");
        assert!(
            from_build.contains(&expected.as_str()),
            "the runtime stage does not take {expected} from the build: {from_build:?}"
        );
    }
    let user = runtime
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, v)| v.clone())
        .expect("a USER: the image must not run as root");
    let uid = trellis_control::inject::PROXY_UID;
    assert_eq!(
        user,
        format!("{uid}:{uid}"),
        "the capture rules exempt UID {uid}"
    );
    let entrypoint = runtime
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(entrypoint, r#"["trellis-proxy"]"#);
    let run = runtime
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, v)| v.as_str())
        .collect::<String>();
    for package in ["iptables", "wget"] {
        assert!(
            run.contains(package),
            "the runtime stage does not install {package}"
        );
    }
}

/// The workspace members from the top-level Cargo.toml (a line-based read of its
/// `members = [...]`, enough for this file's format; a format it cannot read fails the test).
mod toml_members {
    pub struct Workspace {
        pub members: Vec<String>,
    }

    pub fn parse(text: &str) -> Workspace {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("members"))
            .expect("Cargo.toml has a members line");
        let list = line.split_once('=').unwrap().1.trim();
        let members: Vec<String> = serde_json::from_str(list)
            .unwrap_or_else(|e| panic!("members list {list:?} on one line: {e}"));
        assert!(!members.is_empty());
        Workspace { members }
    }
}
