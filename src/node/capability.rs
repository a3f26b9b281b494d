//! A CSI `VolumeCapability`, checked and turned into what this node does.

use rustix::mount::MountFlags;

use crate::attach::mount::parse_mount_options;
use crate::attach::Filesystem;
use crate::csi;
use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::volume_capability::AccessType;

use super::error::NodeError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A filesystem. `fs` is `None` when the request names none: ext4 for a
    /// blank volume, whatever is there otherwise.
    Mount { fs: Option<Filesystem>, flags: Vec<String> },
    /// The raw device.
    Block,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
    /// Nothing may write: a reader-only access mode, or "ro" among the
    /// mount flags. The volume is then staged and published read-only.
    pub read_only: bool,
}

impl Capability {
    /// A second publish of the volume at another target must be refused.
    pub fn single_writer(&self) -> bool {
        self.mode == Mode::SingleNodeSingleWriter
    }
}

fn invalid(reason: impl Into<String>) -> NodeError {
    NodeError::InvalidCapability { reason: reason.into() }
}

/// Check the capability of a Stage or Publish call. Nothing that fails here
/// reaches the disk.
pub fn parse(cap: Option<&csi::VolumeCapability>) -> Result<Capability, NodeError> {
    let cap = cap.ok_or(NodeError::Missing { field: "volume_capability", hint: " (mount or block, and an access mode)" })?;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).map_err(|_| invalid(format!("unknown access mode {}", m.mode))))
        .transpose()?
        .ok_or_else(|| invalid("access_mode is required"))?;
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => return Err(invalid("access_mode is UNKNOWN; use a SINGLE_NODE_* mode")),
        // Remote attach (NBD) is a later milestone: a volume is used only on
        // the node that holds it.
        Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(invalid(format!(
                "access mode {} is not supported: cinderblock volumes attach on one node; use a SINGLE_NODE_* mode",
                mode.as_str_name()
            )))
        }
    }
    let mut ro_flag = false;
    let access = match cap.access_type.as_ref() {
        None => return Err(invalid("access_type is required: mount or block")),
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            if !m.volume_mount_group.is_empty() {
                return Err(invalid(
                    "volume_mount_group is not supported (the VOLUME_MOUNT_GROUP capability is not offered); leave it empty",
                ));
            }
            let fs = match m.fs_type.as_str() {
                "" => None,
                other => Some(Filesystem::parse(other).map_err(|e| invalid(e.to_string()))?),
            };
            // Refuse options the mount would refuse, before anything is attached.
            let options = parse_mount_options(&m.mount_flags, false).map_err(|e| invalid(e.to_string()))?;
            ro_flag = options.flags.contains(MountFlags::RDONLY);
            Access::Mount { fs, flags: m.mount_flags.clone() }
        }
    };
    Ok(Capability { access, mode, read_only: mode == Mode::SingleNodeReaderOnly || ro_flag })
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode, BlockVolume, MountVolume};
    use tonic::Code;

    fn mount(fs: &str, flags: &[&str], mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn good_capabilities() {
        let c = parse(Some(&mount("", &["noatime"], Mode::SingleNodeWriter))).unwrap();
        assert_eq!(c.access, Access::Mount { fs: None, flags: vec!["noatime".into()] });
        let c = parse(Some(&mount("xfs", &[], Mode::SingleNodeReaderOnly))).unwrap();
        assert_eq!(c.access, Access::Mount { fs: Some(Filesystem::Xfs), flags: vec![] });
        assert!(c.read_only);
        let c = parse(Some(&mount("ext4", &["noatime,ro"], Mode::SingleNodeWriter))).unwrap();
        assert!(c.read_only, "an ro mount flag makes the volume read-only");
        assert!(!parse(Some(&mount("ext4", &["noatime"], Mode::SingleNodeWriter))).unwrap().read_only);
        let block = csi::VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode { mode: Mode::SingleNodeSingleWriter as i32 }),
        };
        let c = parse(Some(&block)).unwrap();
        assert!(c.access == Access::Block && c.single_writer());
    }

    #[test]
    fn bad_capabilities_are_invalid_arguments() {
        let mut no_type = mount("ext4", &[], Mode::SingleNodeWriter);
        no_type.access_type = None;
        let mut no_mode = mount("ext4", &[], Mode::SingleNodeWriter);
        no_mode.access_mode = None;
        let mut odd_mode = mount("ext4", &[], Mode::SingleNodeWriter);
        odd_mode.access_mode = Some(AccessMode { mode: 99 });
        let mut group = mount("ext4", &[], Mode::SingleNodeWriter);
        if let Some(AccessType::Mount(m)) = group.access_type.as_mut() {
            m.volume_mount_group = "1000".into();
        }
        let cases = [
            ("none", None),
            ("no type", Some(no_type)),
            ("no mode", Some(no_mode)),
            ("odd mode", Some(odd_mode)),
            ("unknown mode", Some(mount("ext4", &[], Mode::Unknown))),
            ("multi node", Some(mount("ext4", &[], Mode::MultiNodeMultiWriter))),
            ("multi reader", Some(mount("ext4", &[], Mode::MultiNodeReaderOnly))),
            ("btrfs", Some(mount("btrfs", &[], Mode::SingleNodeWriter))),
            ("bind flag", Some(mount("ext4", &["bind"], Mode::SingleNodeWriter))),
            ("mount group", Some(group)),
        ];
        for (what, cap) in cases {
            let e = parse(cap.as_ref()).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
        }
    }
}
