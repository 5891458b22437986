//! The OME-XML of deepis's OME-TIFF stacks (`crate::ome_tiff` writes them): written here, and read
//! back for the physical voxel size (`crate::voxel`) and for the stack's axes (`crate::io`).
//! A leaf module: the writer and the readers depend on it, it on nothing of theirs.

/// The OME-XML of a stack of `size_t` x `size_c` x `size_z` pages of `h` x `w`.
pub fn ome_xml(ty: &str, [size_t, size_c, size_z, h, w]: [usize; 5], voxel: Option<[f64; 3]>, time_interval_s: Option<f64>, name: &str) -> String {
    let mut phys = voxel.map_or(String::new(), |v| {
        format!(r#" PhysicalSizeX="{}" PhysicalSizeY="{}" PhysicalSizeZ="{}""#, v[2], v[1], v[0])
    });
    if let Some(t) = time_interval_s {
        phys += &format!(r#" TimeIncrement="{t}" TimeIncrementUnit="s""#);
    }
    let channels: String = (0..size_c).map(|c| format!(r#"<Channel ID="Channel:0:{c}" SamplesPerPixel="1"/>"#)).collect();
    let name: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || "._- ".contains(*c)).collect();
    format!(
        concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?>"#,
            r#"<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" "#,
            r#"xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd" Creator="deepis {ver}">"#,
            r#"<Image ID="Image:0" Name="{name}"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="{ty}" "#,
            r#"SizeX="{w}" SizeY="{h}" SizeZ="{z}" SizeC="{c}" SizeT="{t}"{phys}>{channels}"#,
            r#"<TiffData IFD="0" PlaneCount="{planes}"/></Pixels></Image></OME>"#
        ),
        ver = env!("CARGO_PKG_VERSION"),
        name = name,
        ty = ty,
        w = w,
        h = h,
        z = size_z,
        c = size_c,
        t = size_t,
        phys = phys,
        channels = channels,
        planes = size_t * size_c * size_z
    )
}

/// The value of XML attribute `name="..."` (first occurrence).
pub fn attr(xml: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let s = xml.find(&key)? + key.len();
    let e = xml[s..].find('"')?;
    Some(xml[s..s + e].to_string())
}

/// The dims of a stack of `pages` pages of `h` x `w` that `desc` (an ImageDescription) describes
/// as OME-XML, DimensionOrder XYZCT: [T, C, Z, h, w] with T and C left out where they are 1
/// ([T, Z, h, w], [C, Z, h, w], [Z, h, w]); None when `desc` is not OME-XML or does not add up
/// to the pages (the stack is then read as Z pages).
pub fn dims(desc: &str, pages: usize, h: usize, w: usize) -> Option<Vec<usize>> {
    if !desc.contains("<OME") || attr(desc, "DimensionOrder")? != "XYZCT" {
        return None;
    }
    let size = |a: &str| attr(desc, a).and_then(|v| v.parse::<usize>().ok());
    let (x, y, z, c, t) = (size("SizeX")?, size("SizeY")?, size("SizeZ")?, size("SizeC")?, size("SizeT")?);
    if (x, y) != (w, h) || z.checked_mul(c)?.checked_mul(t)? != pages {
        return None;
    }
    let mut d = Vec::with_capacity(5);
    if t > 1 {
        d.push(t);
    }
    if c > 1 {
        d.push(c);
    }
    d.extend([z, h, w]);
    Some(d)
}

/// The seconds between frames that `desc` (an ImageDescription) records as OME-XML
/// `TimeIncrement` (unit s, ms or min; s when not given).
pub fn time_increment_s(desc: &str) -> Option<f64> {
    if !desc.contains("<OME") {
        return None;
    }
    let t = attr(desc, "TimeIncrement")?.parse::<f64>().ok()?;
    let unit = match attr(desc, "TimeIncrementUnit").as_deref() {
        None | Some("s") => 1.0,
        Some("ms") => 1e-3,
        Some("min") => 60.0,
        Some(_) => return None,
    };
    Some(t * unit).filter(|t| t.is_finite() && *t > 0.0)
}
